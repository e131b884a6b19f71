"""The native CPU backend: float32 CPU weights updated by the C kernels, a whole group per call.

It is a fused backend: one call takes the statistics, the thresholds and the masks (two passes
over the weights: see :mod:`lit_prune.backends.cpu.kernels`), so it is chosen only where the
reduce step is local.  Each group keeps its checked batches (pointer arrays, buffers) in
``Group.work`` while its tensors stay; the results equal the torch backend's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_prune.backends.base import Backend, Begun
from lit_prune.backends.cpu import kernels
from lit_prune.backends.cpu.updates import magnitude_update_
from lit_prune.config.hparams import PruningHParams
from lit_prune.engine.blocks import block_grid, block_view_shape, resolve_block_dims
from lit_prune.engine.nm import in_memory_order, nm_pruned_per_group
from lit_prune.engine.plan import Group, GroupResult, UpdateRequest
from lit_prune.engine.sharding import is_sharded
from lit_prune.engine.state import WeightState
from lit_prune.engine.statistics import abs_maxima
from lit_prune.engine.thresholds import decay_pair, kernel_targets

__all__ = ["NativeCpuBackend"]

#: The kernels keep a sample histogram of ``nbins`` counts per weight; beyond this the torch backend is used.
MAX_NBINS = 1 << 16


@dataclass
class _Blocks:
    """What the block kernels work on: 2-D views, masks, block dims, pooled scores and block masks."""

    batch: kernels.BlockBatch  # pools into `pooled`, expands `block_masks`
    scores: kernels.MagnitudeBatch | None  # thresholds and block masks from `pooled`; None: thresholds not float32 CPU
    views: list[Tensor]
    masks: list[Tensor]
    dims: list[tuple[int, int]]
    pooled: list[Tensor]
    block_masks: list[Tensor]
    thresholds: list[Tensor]


class NativeCpuBackend(Backend):
    """The C kernels on contiguous float32 CPU weights (magnitude scores only)."""

    name = "cpu"
    fused = True

    # ------------------------------------------------------------------ choice
    @staticmethod
    def refuses(granularity: str, state: WeightState, hparams: PruningHParams) -> str | None:
        """Why the kernels cannot update this weight (``None``: they can).  Asks for the build last."""
        param, mask = state.param, state.mask
        if is_sharded(param):
            return "a sharded weight (its statistics are reduced across processes)"
        if hparams.prune_option != "weight":
            return f"prune_option={hparams.prune_option!r} ranks a saliency; the kernels rank |w|"
        if granularity == "global":
            return "global_ranking ranks several weights together"
        if not (kernels.fits(param) and mask.is_contiguous() and mask.shape == param.shape):
            return f"not a contiguous float32 CPU weight with its mask ({param.dtype} on {param.device})"
        if granularity == "nm" and state.spec.nm[1] > kernels.NM_MAX_M:  # type: ignore[index]
            return f"N:M with M > {kernels.NM_MAX_M}"
        if granularity == "nm" and not in_memory_order(param.dim(), state.spec.input_dims):
            return "N:M groups along an input dim that is not the last (e.g. HF Conv1D [in, out]): not consecutive"
        if granularity != "nm" and hparams.threshold_method == "histogram" and hparams.nbins > MAX_NBINS:
            return f"nbins > {MAX_NBINS}"
        if granularity == "elementwise" and not kernels.threshold_fits(state.threshold):
            return "its threshold is not one float32 on the CPU"
        return NativeCpuBackend.unavailable()

    @staticmethod
    def refuses_apply(state: WeightState) -> str | None:
        """Why ``apply_mask``'s kernel cannot take this weight (``None``: it can)."""
        param, mask = state.param, state.mask
        if is_sharded(param) or is_sharded(mask):
            return "a sharded weight"
        if not (kernels.fits(param) and mask.dtype == torch.bool and mask.is_contiguous()):
            return "not a contiguous float32 CPU weight with a contiguous bool mask"
        if mask.numel() != param.numel():
            return "its mask does not match it"
        return NativeCpuBackend.unavailable()

    @staticmethod
    def unavailable() -> str | None:
        """Why the kernels cannot run now (``None``: they can); builds them at the first ask."""
        if torch.compiler.is_compiling():
            return "inside torch.compile"
        if not kernels.available():
            return "the kernels are not built (no C compiler, or LIT_PRUNE_NATIVE=0)"
        return None

    # ------------------------------------------------------------------ update
    def begin(self, group: Group, request: UpdateRequest) -> Begun:  # noqa: D102
        if group.granularity == "nm":  # the N:M kernel writes as it goes: check first
            return Begun(torch.isfinite(torch.stack(abs_maxima([w.param for w in group.weights]))))
        if group.granularity == "block":
            blocks = self._blocks(group)
            blocks.batch.pool(request.hparams.block_pooling_function, apply=[not w.dense for w in group.weights])
        return Begun(None)  # the element-wise kernel checks before it writes

    def finish(self, group: Group, begun: Begun, request: UpdateRequest) -> GroupResult:  # noqa: D102
        hp = request.hparams
        sparsities = [request.sparsities[w.name] for w in group.weights]
        applied = [not w.dense for w in group.weights]
        if group.granularity == "nm":
            return GroupResult(self._nm(group, sparsities, applied))
        if group.granularity == "block":
            return GroupResult(self._block(group, sparsities, applied, request))
        batch = self._magnitude(group)
        found = batch.update(
            kernel_targets(batch.sizes, sparsities, hp.threshold_method),
            exact=hp.threshold_method == "exact",
            nbins=hp.nbins,
            decay=decay_pair(hp.threshold_decay),
            apply=applied,
        )
        return GroupResult(found.kept)

    def _magnitude(self, group: Group) -> kernels.MagnitudeBatch:
        if group.work is None:
            group.work = kernels.MagnitudeBatch(
                [w.param.detach() for w in group.weights], [w.mask for w in group.weights],
                [w.threshold for w in group.weights],
            )  # fmt: skip
        return group.work

    def _nm(self, group: Group, sparsities: list[float], applied: list[bool]) -> list[int]:
        nms = [w.spec.nm for w in group.weights]
        return kernels.nm_update(
            [w.param.detach() for w in group.weights],
            [w.mask for w in group.weights],
            nms,  # type: ignore[arg-type]
            [nm_pruned_per_group(m, s, n) for (n, m), s in zip(nms, sparsities, strict=True)],  # type: ignore[misc]
            [w.threshold for w in group.weights],
            apply=applied,
            check=False,  # checked in begin, with the others, before anything was written
        )

    def _block(self, group: Group, sparsities: list[float], applied: list[bool], request: UpdateRequest) -> list[int]:
        hp, blocks = request.hparams, self._blocks(group)
        if blocks.scores is not None:  # block masks and thresholds (in place) from the pooled scores
            blocks.scores.update(
                kernel_targets(blocks.scores.sizes, sparsities, hp.threshold_method),
                exact=hp.threshold_method == "exact",
                nbins=hp.nbins,
                decay=decay_pair(hp.threshold_decay),
            )
        else:  # thresholds the kernel cannot write in place (not float32 CPU): through float32 copies
            magnitude_update_(
                blocks.pooled, blocks.thresholds, sparsities, blocks.block_masks, method=hp.threshold_method,
                nbins=hp.nbins, threshold_decay=hp.threshold_decay,
            )  # fmt: skip
        return blocks.batch.expand(apply=applied)

    def _blocks(self, group: Group) -> _Blocks:
        """The block kernels' views, buffers and checked batches, made once per group."""
        if group.work is not None:
            return group.work
        params = [w.param.detach() for w in group.weights]
        views = [p.view(block_view_shape(p.shape)) for p in params]
        masks = [w.mask.view(v.shape) for w, v in zip(group.weights, views, strict=True)]
        dims = [resolve_block_dims(w.spec.block_dims, v.shape) for w, v in zip(group.weights, views, strict=True)]
        grids = [block_grid(v.shape, d) for v, d in zip(views, dims, strict=True)]
        # Views of two buffers kept with the plan: fresh ones would page-fault on every page written.
        total = sum(r * c for r, c in grids)
        scores, flags = torch.empty(total, dtype=torch.float32), torch.empty(total, dtype=torch.bool)
        pooled, block_masks, at = [], [], 0
        for r, c in grids:
            pooled.append(scores[at : at + r * c].view(r, c))
            block_masks.append(flags[at : at + r * c].view(r, c))
            at += r * c
        thresholds = [w.threshold for w in group.weights]
        fits = all(kernels.threshold_fits(t) for t in thresholds)
        group.work = _Blocks(
            batch=kernels.BlockBatch(views, dims, masks, pooled, block_masks),
            scores=kernels.MagnitudeBatch(pooled, block_masks, thresholds) if fits else None,
            views=views, masks=masks, dims=dims, pooled=pooled, block_masks=block_masks, thresholds=thresholds,
        )  # fmt: skip
        return group.work

    # ------------------------------------------------------------------ apply_mask
    def apply(self, group: Group) -> None:  # noqa: D102
        which = [not w.dense for w in group.weights]
        if not any(which):
            return
        if group.work is None:
            group.work = kernels.MaskBatch([w.param.detach() for w in group.weights], [w.mask for w in group.weights])
        group.work.apply(which)
