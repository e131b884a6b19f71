"""The torch reference backend: every device, every option; the backend all others are tested against.

A group's update is the pipeline step by step: the current masks applied and the saliency state
advanced (:mod:`~lit_prune.engine.scores`); the local statistics (maxima, finiteness,
:mod:`~lit_prune.engine.statistics`); the reduce step (:mod:`~lit_prune.engine.reduce`); the
thresholds, from per-bin counts for the histogram rule (reduced too) or the ``k``-th score for
the exact rule (:mod:`~lit_prune.engine.thresholds`); then masks and zeros
(:mod:`~lit_prune.engine.masks`).  Scores are recomputed where needed into one scratch buffer
the size of the largest weight, rather than kept: no second copy of the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_prune.backends.base import Backend, Begun
from lit_prune.engine.masks import compare_for, smoothed_threshold_and_cut, write_mask, zero_pruned
from lit_prune.engine.nm import nm_mask, nm_pruned_per_group
from lit_prune.engine.plan import Group, GroupResult, UpdateRequest
from lit_prune.engine.saliency import advance_saliency_of
from lit_prune.engine.scores import apply_current_masks, ranked_numel, scores_of
from lit_prune.engine.scratch import Scratch
from lit_prune.engine.shard_blocks import counted_blocks, pool_blocks, write_shard_mask
from lit_prune.engine.state import WeightState
from lit_prune.engine.statistics import abs_maxima
from lit_prune.engine.thresholds import (
    bin_counts,
    exact_threshold_of,
    histogram_target_count,
    histogram_threshold,
    kth_smallest_by_counts_of,
    kth_smallest_in_bands_of,
    threshold_bins,
    topk_count,
)

__all__ = ["TorchBackend"]


@dataclass
class _Statistics:
    """A group's local statistics: per weight finiteness, per unit maximum, pooled block scores."""

    units: list[list[WeightState]]
    maxima: Tensor  # one per unit
    pooled: dict[str, Tensor]  # block-pruned weights' pooled scores of the blocks this shard touches (small)
    ranked: dict[str, Tensor]  # of those, the blocks this process counts (views)


class TorchBackend(Backend):
    """Eager torch ops on any device; no host read unless the device is the CPU (where reads are free)."""

    name = "torch"

    def begin(self, group: Group, request: UpdateRequest) -> Begun:  # noqa: D102
        hp = request.hparams
        apply_current_masks(group.weights)
        advance_saliency_of(
            [(w.local_param, w.saliency) for w in group.weights],
            hp.prune_option,
            hp.gradient_decay_rate,
            reduce_sum=None if group.reducer.local else group.reducer.sum_,
            counted=list(group.counted.values()),
        )
        weight_maxima = abs_maxima([w.local_param for w in group.weights])
        finite = torch.isfinite(torch.stack(weight_maxima))
        if not group.reducer.local:  # a NaN in any process's shard stops every process
            finite = group.reducer.sum_((~finite).to(torch.int64)) == 0
        units = [group.weights] if group.granularity == "global" else [[w] for w in group.weights]
        pooled = self._pooled_blocks(group, request)
        largest = dict(zip((w.name for w in group.weights), weight_maxima, strict=True))
        maxima = [
            torch.stack([self._max_score(w, largest[w.name], pooled, request) for w in unit]).amax() for unit in units
        ]
        ranked = {name: counted_blocks(scores, group.blocks[name]) for name, scores in pooled.items()}
        return Begun(finite, _Statistics(units, torch.stack(maxima).to(torch.float32), pooled, ranked))

    @staticmethod
    def _pooled_blocks(group: Group, request: UpdateRequest) -> dict[str, Tensor]:
        """Block-pruned weights' pooled scores; blocks cut by shard boundaries are completed in one sum."""
        option = request.hparams.prune_option
        weights = {w.name: w for w in group.weights}
        return pool_blocks(
            group.blocks,
            lambda name: scores_of(weights[name], option, request.scores),
            group.counted,
            group.reducer.sum_,
            request.hparams.block_pooling_function,
        )

    @staticmethod
    def _max_score(w: WeightState, weight_max: Tensor, pooled: dict[str, Tensor], request: UpdateRequest) -> Tensor:
        """The largest score ``w`` is ranked by: ``max |w|``, its largest saliency or pooled block score."""
        option = request.hparams.prune_option
        if w.name in pooled:
            return abs_maxima([pooled[w.name]])[0]  # an empty shard's maximum is 0
        if option == "weight":
            return weight_max.to(torch.float32)
        return abs_maxima([scores_of(w, option, request.scores)])[0]  # scores are >= 0; an empty shard's max is 0

    def finish(self, group: Group, begun: Begun, request: UpdateRequest) -> GroupResult:  # noqa: D102
        stats: _Statistics = begun.data
        maxima = group.reducer.max_(stats.maxima)
        if group.rule == "nm":
            current = None
        elif group.rule == "histogram" and not (request.hparams.use_tpu and group.reducer.local):
            current = self._histogram_thresholds(group, stats, maxima, request)
        else:
            current = self._sorted_thresholds(group, stats, maxima, request)
        smoothed = None
        if current is not None:  # every unit's smoothed threshold and cut at once
            previous = torch.stack([unit[0].threshold for unit in stats.units])
            smoothed = smoothed_threshold_and_cut(current, maxima, previous, request.hparams.threshold_decay)
        finite = begun.finite.all().reshape(1) if group.granularity == "global" else begun.finite  # type: ignore[union-attr]
        kept: list[Tensor] = []
        for u, unit in enumerate(stats.units):
            pair = None if smoothed is None else (smoothed[0][u], smoothed[1][u])
            kept += self._write_unit(group, unit, stats, pair, finite[u], request)
        if group.rule == "nm" and not group.reducer.local:  # the largest pruned score over all shards
            thresholds = group.reducer.max_(torch.stack([w.threshold for w in group.weights]))
            for w, threshold in zip(group.weights, thresholds.unbind(), strict=True):
                w.threshold.copy_(threshold)
        if request.deferred:
            return GroupResult(None)
        if group.reducer.local:
            return GroupResult(torch.stack(kept))
        mine = [k if c else torch.zeros_like(k) for k, c in zip(kept, group.counted.values(), strict=True)]
        return GroupResult(group.reducer.sum_(torch.stack(mine)))

    def _ranked(self, w: WeightState, stats: _Statistics, request: UpdateRequest) -> Tensor:
        """The scores ``w`` is ranked by: its pooled block scores, or its scores in the scratch buffer."""
        return (
            stats.ranked[w.name]
            if w.name in stats.ranked
            else scores_of(w, request.hparams.prune_option, request.scores)
        )

    def _histogram_thresholds(self, group: Group, stats: _Statistics, maxima: Tensor, request: UpdateRequest) -> Tensor:
        """TF's histogram thresholds of every unit, from per-bin counts combined by the reduce step."""
        nbins = request.hparams.nbins
        counts, targets = [], []
        for u, unit in enumerate(stats.units):
            mine = [self._bin_counts(w, stats, maxima[u], request) for w in unit if group.counted[w.name]]
            counts.append(sum(mine) if mine else torch.zeros(nbins, dtype=torch.int64, device=maxima.device))
            numel = sum(ranked_numel(w) for w in unit)  # the whole weights' (or block grids') sizes
            targets.append(histogram_target_count(numel, request.sparsities[unit[0].name]))
        totals = group.reducer.sum_(torch.stack(counts))  # type: ignore[arg-type]
        wanted = torch.stack([torch.full((), k, dtype=torch.int64, device=maxima.device) for k in targets])  # fills
        bins = threshold_bins(totals, wanted)
        thresholds = torch.div(bins, float(nbins)).mul_(maxima)  # K = 0 gives bin 0: threshold 0
        return torch.where(maxima > 0, thresholds, torch.zeros_like(thresholds))

    def _bin_counts(self, w: WeightState, stats: _Statistics, max_score: Tensor, request: UpdateRequest) -> Tensor:
        """``w``'s scores counted per TF bin; ``|w|`` of a float32 weight straight from the weight (no copy)."""
        nbins = request.hparams.nbins
        if _ranks_its_own_magnitude(w, stats, request):
            return bin_counts(w.local_param, max_score, nbins, absolute=True, scratch=request.counting)
        return bin_counts(self._ranked(w, stats, request), max_score, nbins, scratch=request.counting)

    def _sorted_thresholds(self, group: Group, stats: _Statistics, maxima: Tensor, request: UpdateRequest) -> Tensor:
        """The exact rule's ``k``-th scores (and ``use_tpu``'s histogram by sort-count), unit by unit."""
        hp, out, rule = request.hparams, [], group.rule
        if not group.reducer.local:  # shards: the k-th scores from counts combined across processes, all units at once
            return self._reduced_exact_thresholds(group, stats, maxima, request)
        for u, unit in enumerate(stats.units):
            sparsity = request.sparsities[unit[0].name]
            if rule == "histogram":  # use_tpu: one weight per unit, static shapes
                ranked = self._ranked(unit[0], stats, request)
                out.append(histogram_threshold(ranked, sparsity, hp.nbins, max_value=maxima[u], sort_count=True))
                continue
            numel = sum(stats.ranked.get(w.name, w.param).numel() for w in unit)

            def parts(unit=unit):
                return (self._ranked(w, stats, request).reshape(-1) for w in unit)  # one at a time

            whole = len(unit) == 1
            out.append(
                exact_threshold_of(
                    parts, numel, maxima[u], sparsity, static=hp.use_tpu, whole=whole, scratch=request.counting
                )
            )
        return torch.stack(out).to(torch.float32)

    def _reduced_exact_thresholds(
        self, group: Group, stats: _Statistics, maxima: Tensor, request: UpdateRequest
    ) -> Tensor:
        """The exact rule over shards: each unit's ``k``-th score from reduced counts (value bins, then bytes)."""
        sizes = [sum(ranked_numel(w) for w in unit) for unit in stats.units]  # the whole weights' sizes
        kept = [topk_count(n, request.sparsities[unit[0].name]) for n, unit in zip(sizes, stats.units, strict=True)]
        ranks = [n - k + 1 if k else n for n, k in zip(sizes, kept, strict=True)]  # the rank-th smallest score
        streams = [
            (lambda unit=unit: (self._ranked(w, stats, request).reshape(-1) for w in unit if group.counted[w.name]))
            for unit in stats.units
        ]
        if maxima.device.type == "cpu":  # a first round by value bins, then byte rounds over one bin's copies
            found = kth_smallest_in_bands_of(streams, ranks, maxima, group.reducer.sum_)
        else:  # no boolean indexing (it reads back): byte rounds over all scores
            found = kth_smallest_by_counts_of(streams, ranks, group.reducer.sum_, maxima.device)
        none = torch.stack([torch.full((), k == 0, device=maxima.device) for k in kept])  # fills: no host copy
        return torch.where(none, torch.nextafter(maxima, torch.full_like(maxima, math.inf)), found)

    def _write_unit(
        self,
        group: Group,
        unit: list[WeightState],
        stats: _Statistics,
        threshold_and_cut: tuple[Tensor, Tensor] | None,
        ok: Tensor,
        request: UpdateRequest,
    ) -> list[Tensor]:
        """Masks, thresholds and zeros of one unit (``None``: N:M); where not ``ok`` (non-finite) the old ones stay."""
        hp, rule, nm = request.hparams, group.rule, threshold_and_cut is None
        if not nm:
            threshold, cut = threshold_and_cut  # type: ignore[misc]
        kept = []
        for w in unit:
            mask = w.local_mask
            target = request.staging.take(mask.shape, mask.device) if request.deferred else mask
            chunked = not nm and _in_chunks(w, stats, request)
            if nm:
                scores = scores_of(w, hp.prune_option, request.scores)
                n, m = w.spec.nm  # type: ignore[misc]
                pruned = nm_pruned_per_group(m, request.sparsities[w.name], n)
                nm_mask(scores, m, pruned, out=target, input_dims=w.spec.input_dims)
                threshold = abs_maxima([scores.masked_fill_(target, 0.0)])[0]  # the largest pruned score (scratch)
            elif chunked:
                _mask_and_zero_in_chunks(w, cut, rule, request.scores)  # one read of the weight, cached passes
            elif w.name in stats.pooled:  # every block this shard touches, counted here or not
                write_shard_mask(compare_for(rule)(stats.pooled[w.name], cut), group.blocks[w.name], target)
            else:
                write_mask(self._ranked(w, stats, request), cut, rule, mask.shape, None, target)
            _commit(w, target, threshold, ok, request.deferred)
            if not chunked:  # the chunks zeroed their weight as they went
                zero_pruned(w.local_param, mask)
            if not request.deferred:
                kept.append(torch.count_nonzero(mask))
        return kept

    def apply(self, group: Group) -> None:  # noqa: D102
        apply_current_masks(group.weights)


#: Elements masked and zeroed at a time by :func:`_mask_and_zero_in_chunks` (a MiB of scores: in cache).
_CHUNK = 1 << 18


def _ranks_its_own_magnitude(w: WeightState, stats: _Statistics, request: UpdateRequest) -> bool:
    """Whether ``w`` is ranked element-wise by ``|w|`` of a float32 weight (the scores need no buffer)."""
    return request.hparams.prune_option == "weight" and w.name not in stats.pooled and w.param.dtype == torch.float32


def _in_chunks(w: WeightState, stats: _Statistics, request: UpdateRequest) -> bool:
    """Whether ``w``'s mask is written and its weight zeroed chunk by chunk (in place: contiguous, not deferred)."""
    contiguous = w.local_param.is_contiguous() and w.local_mask.is_contiguous()
    return not request.deferred and contiguous and _ranks_its_own_magnitude(w, stats, request)


def _mask_and_zero_in_chunks(w: WeightState, cut: Tensor, rule: str, scratch: Scratch) -> None:
    """The mask of ``|w|`` against ``cut`` and the pruned weights zeroed, a cache-sized chunk at a time.

    The same masks as :func:`~lit_prune.engine.masks.write_mask` on ``|w|`` followed by
    :func:`~lit_prune.engine.masks.zero_pruned`; the weight is read from memory once.
    """
    compare = compare_for(rule)
    weight, mask = w.local_param.reshape(-1), w.local_mask.reshape(-1)
    buffer = scratch.take(torch.Size([min(_CHUNK, weight.numel())]), weight.device)
    for start in range(0, weight.numel(), _CHUNK):
        part, keep = weight[start : start + _CHUNK], mask[start : start + _CHUNK]
        compare(torch.abs(part, out=buffer[: part.numel()]), cut, out=keep)
        part.mul_(keep.view(torch.uint8))


def _commit(w: WeightState, new_mask: Tensor, threshold: Tensor, ok: Tensor, deferred: bool) -> None:
    """Store the new mask and threshold; deferred (accelerators): only where the weights were finite."""
    if deferred:
        torch.where(ok, new_mask, w.local_mask, out=w.local_mask)
        threshold = torch.where(ok, threshold, w.threshold.to(threshold.dtype))
    w.threshold.copy_(threshold)
