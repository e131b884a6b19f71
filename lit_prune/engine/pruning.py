"""The ``Pruning`` object: TF's ``pruning.Pruning`` for a PyTorch module.

It binds a :class:`~lit_prune.PruningHParams` spec to the weights of a model (chosen by parameter
name), owns one ``torch.bool`` mask (1 byte per weight) and one float32 threshold per weight, and
offers TF's API in PyTorch form: ``conditional_mask_update(step)`` (TF's gating rule),
``mask_update(step)``, ``apply_mask()``, the ``get_*`` getters, ``summaries()`` and
``state_dict()``/``load_state_dict()``.  Plain torch: no Lightning, no Hydra.

Unlike TF, which kept raw weights and multiplied them by the mask in every forward pass,
lit_prune zeroes pruned weights in place (no second copy of the weights, no forward hook).
A pruned weight is therefore 0 at the next update and ranks last, so masks do not regrow as
TF's could (TF re-ranked raw weights that momentum or weight decay kept moving).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_prune.backends.cpu import kernels as cpu_kernels
from lit_prune.config.hparams import (
    HParamsError,
    PruningHParams,
    parse_block_dims_map,
    parse_nm,
    parse_nm_sparsity_map,
    parse_weight_sparsity_map,
)
from lit_prune.engine.layers import MaskedModule
from lit_prune.engine.masks import (
    block_update_,
    block_view_shape,
    compute_mask,
    decay_pair,
    joint_threshold,
    kernel_targets,
    resolve_block_dims,
    smooth_threshold,
)
from lit_prune.engine.nm import check_nm_sparse, nm_group_view, nm_mask, nm_pruned_per_group
from lit_prune.engine.saliency import SALIENCY_STATE, init_saliency_state, update_saliency
from lit_prune.engine.schedule import gradual_sparsity, should_update, weight_sparsity
from lit_prune.engine.selection import match_map, select_weights

__all__ = ["STATE_VERSION", "Pruning", "SparsityFn"]

#: Version of the ``state_dict`` layout; bumped when it changes.
STATE_VERSION = 1

SparsityFn = Callable[[int], float]

#: The fused CPU kernels keep a sample histogram of ``nbins`` counts per weight; beyond this many bins
#: the eager path (one histogram at a time) is used.
_FUSED_MAX_NBINS = 1 << 16


@dataclass
class _Weight:
    """One pruned weight: where it lives and its pruning state."""

    name: str
    module: nn.Module
    param_name: str
    target: float | None  # weight_sparsity_map value, if any
    block_dims: tuple[int, int]
    nm: tuple[int, int] | None = None  # N:M semi-structured, if any
    plain_mask: Tensor | None = None  # masks of plain layers live here ...
    plain_threshold: Tensor | None = None
    buffer_names: tuple[str, str] | None = None  # ... those of masked layers in the layer's buffers
    saliency: dict[str, Tensor] = field(default_factory=dict)

    @property
    def param(self) -> nn.Parameter:
        found = self.module._parameters.get(self.param_name)  # what getattr finds, without Module.__getattr__
        return found if found is not None else getattr(self.module, self.param_name)

    @property
    def mask(self) -> Tensor:
        if self.buffer_names is not None:
            return self._buffer(self.buffer_names[0])
        assert self.plain_mask is not None and self.plain_threshold is not None
        device = self.param.device
        if self.plain_mask.device != device:  # the model moved: masks follow
            if self.plain_mask.is_meta:  # bound on `meta` before any update: masks held no data yet
                self.plain_mask = torch.ones(self.plain_mask.shape, dtype=torch.bool, device=device)
                self.plain_threshold = torch.zeros((), dtype=torch.float32, device=device)
            else:
                self.plain_mask = self.plain_mask.to(device)
                self.plain_threshold = self.plain_threshold.to(device)
        return self.plain_mask

    def tensors(self) -> tuple[nn.Parameter, Tensor, Tensor]:
        """``(param, mask, threshold)`` in one lookup (the plain layers' state moved with the model)."""
        param = self.param
        if self.buffer_names is not None:
            return param, self._buffer(self.buffer_names[0]), self._buffer(self.buffer_names[1])
        if self.plain_mask is not None and self.plain_mask.device == param.device:
            return param, self.plain_mask, self.plain_threshold  # type: ignore[return-value]
        return param, self.mask, self.threshold

    @property
    def threshold(self) -> Tensor:
        if self.buffer_names is not None:
            return self._buffer(self.buffer_names[1])
        self.mask  # noqa: B018 - moves both if the model moved
        assert self.plain_threshold is not None
        return self.plain_threshold

    def _buffer(self, name: str) -> Tensor:
        found = self.module._buffers.get(name)
        return found if found is not None else getattr(self.module, name)


@dataclass
class _KernelPlan:
    """Which fused CPU kernels take each weight, worked out for one set of tensors and reused while they stay.

    Working it out (the tensors looked up and checked, the pointer arrays built) costs about as
    much as a fifth of the update itself on ResNet-18 with cold caches; each update only checks
    that the tensors' pointers are the same.
    """

    key: tuple  # the hparams the choice depends on
    pointers: list[int]  # data pointers of every weight's (param, mask, threshold), in order
    live: dict[str, tuple[nn.Parameter, Tensor, Tensor]]
    kernel: dict[str, str | None]  # "elementwise", "block", "nm" or None (eager)
    fused: list[_Weight]
    blocked: list[_Weight]
    nm_fused: list[_Weight]
    batch: cpu_kernels.MagnitudeBatch | None  # the element-wise ones, checked once
    sizes: dict[str, int]
    applied: list[str]  # the weights apply_mask takes to the kernel: float32 CPU ones, with their masks
    apply_batch: cpu_kernels.MaskBatch | None
    blocks: _BlockPlan | None = None  # the block kernels' views, buffers and batches, made at their first use

    @property
    def names(self) -> frozenset[str]:
        """The weights some kernel takes."""
        return frozenset(w.name for w in self.fused + self.blocked + self.nm_fused)


@dataclass
class _BlockPlan:
    """What the block kernels work on, for one kernel plan: 2-D views, block dims, buffers and their batches."""

    views: list[Tensor]  # the weights' 2-D views
    masks: list[Tensor]  # their masks, as 2-D views
    dims: list[tuple[int, int]]  # resolved block dims
    pooled: list[Tensor]  # pooled scores (scratch of the Pruning)
    block_masks: list[Tensor]  # block masks (scratch of the Pruning)
    thresholds: list[Tensor]
    batch: cpu_kernels.BlockBatch  # pools into `pooled`, expands `block_masks`
    scores: cpu_kernels.MagnitudeBatch | None  # thresholds and block masks from `pooled`; None: not float32 CPU


def _abs_maxima(tensors: list[Tensor]) -> list[Tensor]:
    """``max |t|`` of each tensor, one ``aminmax`` pass each and no ``|t|`` temporary (NaN where ``t`` holds NaN)."""
    extremes = [torch.aminmax(t.detach()) for t in tensors]
    if len({(e.min.device, e.min.dtype) for e in extremes}) != 1:  # mixed devices or dtypes: one at a time
        return [torch.maximum(e.max, e.min.neg()) for e in extremes]
    lows, highs = torch.stack([e.min for e in extremes]), torch.stack([e.max for e in extremes])
    return list(torch.maximum(highs, lows.neg()).unbind())


def _structure(model: nn.Module) -> tuple:
    """The module tree and its parameters (child names, module and parameter ids, shapes, trainability).

    A cheaper walk than ``named_parameters()`` (no names are built), for the check before each
    update: equal structures have the same parameters under the same names.
    """
    out: list = []
    stack = [model]
    while stack:
        module = stack.pop()
        out.append(id(module))
        for name, p in module._parameters.items():
            if p is not None:
                out.append((name, id(p), p.requires_grad, p.shape))
        for name, child in module._modules.items():
            if child is not None:
                out.append(name)
                stack.append(child)
    return tuple(out)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _as_hparams(hparams: PruningHParams | Mapping[str, Any] | str | None) -> PruningHParams:
    if hparams is None:
        return PruningHParams()
    if isinstance(hparams, PruningHParams):
        return hparams
    if isinstance(hparams, str):
        return PruningHParams().parse(hparams)
    if isinstance(hparams, Mapping):
        return PruningHParams.from_dict(hparams)
    raise HParamsError(f"`hparams` must be a PruningHParams, a mapping or a 'name=value,...' string, got {hparams!r}")


class Pruning:
    """Magnitude-based gradual pruning of a module's weights, with TF's semantics.

    Args:
        model: The module whose weights are pruned.  Weights are chosen by parameter name (see
            ``prune_patterns``/``exclude_patterns``); masked layers bring their own mask buffers.
        hparams: A :class:`PruningHParams`, a plain mapping of its fields, a TF-style
            ``"name=value,..."`` string, or ``None`` for TF's defaults.
        sparsity: Overrides the schedule, as TF's ``Pruning(spec, sparsity=...)``: a number or a
            callable of the step.  It is still scaled per weight by ``weight_sparsity_map``.

    Raises:
        HParamsError: a malformed spec, a map entry that matches no pruned weight or matches a
            weight twice, or no weight to prune.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = "target_sparsity=0.75,sparsity_function_end_step=20,threshold_method=exact"
        >>> spec += ",weight_sparsity_map=[^2:0.5]"
        >>> p = Pruning(model, spec)
        >>> [p.conditional_mask_update(step) for step in (5, 10, 15, 20)]
        [False, True, False, True]
        >>> {k: round(float(v), 2) for k, v in p.get_weight_sparsity().items()}
        {'0.weight': 0.75, '2.weight': 0.5}
        >>> bool((model[0].weight[~p.get_masks()["0.weight"]] == 0).all())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        hparams: PruningHParams | Mapping[str, Any] | str | None = None,
        sparsity: float | SparsityFn | None = None,
    ) -> None:
        self.hparams = _as_hparams(hparams)
        cpu_kernels.native_enabled()  # a misspelt LIT_PRUNE_NATIVE fails here, before any training
        if sparsity is not None and not callable(sparsity):
            sparsity = float(sparsity)
            if not 0.0 <= sparsity < 1.0:
                raise HParamsError(f"`sparsity` must be a float in [0, 1) or a callable of the step, got {sparsity}")
        if sparsity is not None and self.hparams.weight_sparsity_map and self.hparams.target_sparsity == 0.0:
            raise HParamsError(
                "an external `sparsity` is scaled per weight by own_target / `target_sparsity` (as in TF): "
                "`target_sparsity` must be > 0 when `weight_sparsity_map` is set"
            )
        self.model = model
        self.sparsity_override = sparsity
        self.last_update_step = 0
        self._weights: dict[str, _Weight] = {}
        self._warned_new: set[str] = set()
        self._model_signature: tuple | None = None  # the parameters as last checked (skip unchanged models)
        self._pending_check: tuple[Tensor, Any, int, list[str]] | None = None
        self._block_scratch: tuple[Tensor, Tensor] | None = None  # pooled scores and block masks (CPU kernels)
        self._plan: _KernelPlan | None = None  # which kernels take which weights (CPU kernels)
        self._bind()
        # Per weight: its mask keeps everything, so apply_mask can skip it.  Masks created here are
        # all ones; a masked layer's own buffers may already hold a pruned mask.
        self._dense = {name: w.buffer_names is None for name, w in self._weights.items()}

    def __getstate__(self) -> dict[str, Any]:
        """What pickling and ``copy.deepcopy`` keep: everything but the kernel plan (raw pointers, rebuilt at need)."""
        state = self.__dict__.copy()
        state["_plan"] = None
        return state

    # ------------------------------------------------------------------ binding
    def _bind(self) -> None:
        hp = self.hparams
        names = select_weights(self.model, hp.prune_patterns, hp.exclude_patterns)
        targets = match_map("weight_sparsity_map", parse_weight_sparsity_map(hp.weight_sparsity_map), names)
        blocks = match_map("block_dims_map", parse_block_dims_map(hp.block_dims_map), names)
        nm_map = match_map("nm_sparsity_map", parse_nm_sparsity_map(hp.nm_sparsity_map), names)
        nm_default = parse_nm("nm_sparsity", hp.nm_sparsity) if hp.nm_sparsity else None
        default_block = (hp.block_height, hp.block_width)
        for name in names:
            module_name, _, param_name = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            param = getattr(module, param_name)
            entry = _Weight(name, module, param_name, targets.get(name), blocks.get(name, default_block))
            entry.nm = nm_map.get(name, nm_default)
            if entry.nm is not None:
                entry.target = self._check_nm_weight(entry, tuple(param.shape))
            if isinstance(module, MaskedModule) and param_name in module.masked_weight_names:
                entry.buffer_names = module.mask_buffer_names(param_name)
            else:
                entry.plain_mask = torch.ones_like(param, dtype=torch.bool)
                entry.plain_threshold = torch.zeros((), dtype=torch.float32, device=param.device)
            entry.saliency = init_saliency_state(param.detach(), hp.prune_option)
            self._weights[name] = entry
        if hp.global_ranking:
            blocked = [w.name for w in self._joint() if w.block_dims != (1, 1)]
            if blocked:
                raise HParamsError(
                    f"`global_ranking` ranks weights element-wise, but {blocked} have block dims: give them a "
                    "`weight_sparsity_map` entry (their own threshold) or 1x1 blocks"
                )

    def _check_nm_weight(self, w: _Weight, shape: tuple[int, ...]) -> float:
        """Validate an N:M weight at binding; return its own target ``1 - N/M``."""
        n, m = w.nm  # type: ignore[misc]
        if nm_group_view(shape, m) is None:
            inner = math.prod(shape[1:]) if len(shape) > 1 else None
            raise HParamsError(
                f"weight {w.name!r} of shape {shape} cannot be {n}:{m}: N:M needs 2+ dims and an input size "
                f"(in*kh*kw = {inner}) divisible by {m}; give N:M only to the weights that fit, with `nm_sparsity_map`"
            )
        if w.target is not None:
            raise HParamsError(
                f"weight {w.name!r} has both a `weight_sparsity_map` target ({w.target}) and N:M {n}:{m}, whose "
                f"target is 1 - N/M = {1 - n / m}: give it one of the two"
            )
        if w.block_dims != (1, 1):
            raise HParamsError(
                f"weight {w.name!r} has block dims {w.block_dims[0]}x{w.block_dims[1]} and N:M {n}:{m}; both cannot "
                "hold (N:M keeps N of every M elements, blocks prune whole blocks): give it one of the two"
            )
        return 1.0 - n / m

    def _joint(self) -> list[_Weight]:
        """The weights ranked together under ``global_ranking``: those without a map target."""
        return [w for w in self._weights.values() if w.target is None] if self.hparams.global_ranking else []

    @property
    def weight_names(self) -> list[str]:
        """Names (as ``model.named_parameters()`` gives them) of the pruned weights."""
        return list(self._weights)

    # ------------------------------------------------------------------ schedule
    def sparsity(self, step: int) -> float:
        """The global sparsity at ``step``: the external override if given, else TF's schedule.

        Example::

            >>> Pruning(torch.nn.Linear(4, 4), sparsity=lambda step: 0.1 * step).sparsity(3)
            0.30000000000000004
        """
        override = self.sparsity_override
        if override is None:
            return gradual_sparsity(step, self.hparams)
        value = float(override(step)) if callable(override) else override
        if not 0.0 <= value < 1.0:
            raise HParamsError(f"the external `sparsity` at step {step} must be in [0, 1), got {value}")
        return value

    def weight_sparsities(self, step: int) -> dict[str, float]:
        """Each pruned weight's sparsity at ``step`` (the global value, or its map target's schedule)."""
        base = None if self.sparsity_override is None else self.sparsity(step)
        global_value = self.sparsity(step)
        return {
            name: global_value if w.target is None else weight_sparsity(step, self.hparams, w.target, base)
            for name, w in self._weights.items()
        }

    # ------------------------------------------------------------------ updates
    def conditional_mask_update(self, step: int) -> bool:
        """Update the masks if TF's rule says so at ``step``; return whether it did.

        The rule: ``begin_pruning_step <= step <= end_pruning_step`` (-1 = no end) and
        ``last_update_step + pruning_frequency <= step``, with ``last_update_step`` starting at 0.
        It is decided on the host from the step alone (no device synchronisation).
        """
        if not should_update(step, self.last_update_step, self.hparams):
            return False
        self.mask_update(step)
        return True

    @torch.no_grad()
    def mask_update(self, step: int) -> None:
        """Recompute every mask and threshold at ``step`` (unconditionally), then zero pruned weights.

        The current masks are applied first (as :meth:`apply_mask`; the fused CPU path folds them
        into its mask pass, with the same result), so the update ranks the weights the model
        uses: a weight pruned before is 0 and ranks last, even if an optimizer step moved it since.
        A training loop therefore needs :meth:`apply_mask` only on the steps that do not update.

        On the CPU the update reads two small vectors back for the whole model (whether each
        weight is finite, and whether each mask still keeps everything).  On an accelerator it
        synchronises nothing: the finiteness flags are copied back asynchronously, a non-finite
        weight keeps its old mask and threshold, and the error is raised by the first
        :meth:`apply_mask` (or update) that finds the copy complete.  With ``use_tpu`` it reads
        nothing back at all (and so cannot check for NaN), and the thresholds use only static
        shapes.  One float32 scratch buffer the size of the largest weight lives for the duration
        of the update (``global_ranking`` holds the scores of all jointly ranked weights instead).

        Raises:
            FloatingPointError: a weight holds NaN or Inf; it is named, and no mask is changed
                (the current masks may have been applied, and the saliency state of ``*_gradient``
                options has advanced by then).  On an
                accelerator this comes from a later call, as above.
            ValueError: a pruned weight was replaced or changed shape since binding (e.g. after
                structured pruning).  Weights added to the model (or unfrozen) since binding are
                not pruned; a warning names them once.
        """
        hp = self.hparams
        self._check_model()
        sparsities = self.weight_sparsities(step)
        weights = list(self._weights.values())
        self._raise_pending_nonfinite()
        defer = not hp.use_tpu and self._defer_checks(weights[0].param)
        joint = self._joint()
        joint_names = {w.name for w in joint}
        # CPU float32 weights pruned by magnitude take the fused kernels: element-wise ones find
        # their own maxima (and Inf/NaN) before they change anything, block-pruned ones are pooled
        # and checked first; the rest are checked here, before any weight changes.
        kernels = not (defer or hp.use_tpu) and cpu_kernels.available() and not torch.compiler.is_compiling()
        if defer:
            self._drop_plan()  # on an accelerator now: the plan's CPU storage is not kept alive
        plan = self._kernel_plan(weights, joint_names) if kernels else None
        live = plan.live if plan else {}
        fused, blocked, nm_fused = (plan.fused, plan.blocked, plan.nm_fused) if plan else ([], [], [])
        fused_names = plan.names if plan else frozenset()
        all_fused = len(fused_names) == len(weights)
        # The update ranks the weights the model uses: the current masks are applied first (the
        # kernels fold them into their passes), so pruned weights rank last.
        if not all_fused:
            self._apply_masks(skip=fused_names, plan=plan)
        weights = [w for w in weights if w.name not in fused_names]
        checked = weights + nm_fused  # the N:M kernel writes as it goes: its weights are checked here
        maxima = _abs_maxima([w.param for w in checked]) if checked else []
        finite = torch.isfinite(torch.stack(maxima)) if checked else None  # None: every weight took the kernels
        if defer:  # accelerators: no host read; the check is read back later, and bad weights keep their masks
            self._queue_nonfinite_check(finite, step, [w.name for w in weights])
        elif not hp.use_tpu and checked:  # use_tpu: no data-dependent host reads at all (TF's TPU path had none)
            flags = finite.cpu()
            if not bool(flags.all()):
                bad = [w for w, ok in zip(checked, flags.tolist(), strict=True) if not ok]
                self._raise_nonfinite(bad, fused + blocked, step)
        kept_by_name: dict[str, int] = {}
        if blocked:
            assert plan is not None  # the block kernels are in its plan
            blocks = plan.blocks = plan.blocks or self._block_plan(blocked, live)
            applied = [not self._dense[w.name] for w in blocked]
            try:
                blocks.batch.pool(hp.block_pooling_function, apply=applied)
            except cpu_kernels.NonFiniteWeights as error:
                self._raise_nonfinite([blocked[i] for i in error.indices], fused, step)
        if fused:
            assert plan is not None and plan.batch is not None
            bad: list[_Weight] = []
            try:
                kept_fused = plan.batch.update(  # writes masks, zeroed weights and thresholds in place
                    kernel_targets(plan.batch.sizes, [sparsities[w.name] for w in fused], hp.threshold_method),
                    exact=hp.threshold_method == "exact",
                    nbins=hp.nbins,
                    decay=decay_pair(hp.threshold_decay),
                    apply=[not self._dense[w.name] for w in fused],
                ).kept
            except cpu_kernels.NonFiniteWeights as error:
                bad = [fused[i] for i in error.indices]
            if bad:
                self._raise_nonfinite(bad, [], step)
            kept_by_name.update(zip([w.name for w in fused], kept_fused, strict=True))
        if blocked:
            targets = [sparsities[w.name] for w in blocked]
            if blocks.scores is not None:  # block masks and thresholds (in place) from the pooled scores
                blocks.scores.update(
                    kernel_targets(blocks.scores.sizes, targets, hp.threshold_method),
                    exact=hp.threshold_method == "exact",
                    nbins=hp.nbins,
                    decay=decay_pair(hp.threshold_decay),
                )
                kept_blocked = blocks.batch.expand(apply=applied)
            else:
                _, kept_blocked = block_update_(  # writes the thresholds in place
                    blocks.views,
                    blocks.pooled,
                    blocks.thresholds,
                    targets,
                    blocks.masks,
                    block_dims=blocks.dims,
                    apply_current=applied,
                    block_masks=blocks.block_masks,
                    method=hp.threshold_method,
                    nbins=hp.nbins,
                    threshold_decay=hp.threshold_decay,
                )
            kept_by_name.update(zip([w.name for w in blocked], kept_blocked, strict=True))
        if nm_fused:
            kept_nm = cpu_kernels.nm_update(
                [live[w.name][0].detach() for w in nm_fused],
                [live[w.name][1] for w in nm_fused],
                [w.nm for w in nm_fused],  # type: ignore[misc]
                [nm_pruned_per_group(w.nm[1], sparsities[w.name], w.nm[0]) for w in nm_fused],  # type: ignore[index]
                [live[w.name][2] for w in nm_fused],
                apply=[not self._dense[w.name] for w in nm_fused],
                check=False,  # checked above, with the others, before anything was written
            )
            kept_by_name.update(zip([w.name for w in nm_fused], kept_nm, strict=True))
        staged: Tensor | None = None  # deferred checks: new masks land here first

        def target(w: _Weight) -> Tensor:
            nonlocal staged
            if not defer:
                return w.mask
            if staged is None or staged.numel() < w.mask.numel():
                staged = torch.empty(max(x.mask.numel() for x in weights), dtype=torch.bool, device=w.mask.device)
            return staged[: w.mask.numel()].view(w.mask.shape)

        def commit(w: _Weight, mask: Tensor, threshold: Tensor, ok: Tensor) -> None:
            if defer:  # a non-finite weight keeps its mask and threshold
                torch.where(ok, mask, w.mask, out=w.mask)
                threshold = torch.where(ok, threshold, w.threshold.to(threshold.dtype))
            w.threshold.copy_(threshold)

        if joint:  # one threshold for all of them, from all their scores (held for this update)
            scores = {w.name: self._scores(w) for w in joint}
            shared = joint_threshold(list(scores.values()), sparsities[joint[0].name], hp.threshold_method, hp.nbins)
            shared = smooth_threshold(shared, joint[0].threshold.to(torch.float32), hp.threshold_decay)
            compare = torch.gt if hp.threshold_method == "histogram" else torch.ge
            all_ok = torch.stack([finite[i] for i, w in enumerate(weights) if w.name in joint_names]).all()
            for w in joint:
                commit(w, compare(scores[w.name], shared, out=target(w)), shared, all_ok)
        scratch: Tensor | None = None
        for i, (w, max_abs) in enumerate(zip(weights, maxima[: len(weights)], strict=True)):
            if w.name in joint_names:
                continue
            param = w.param
            stale = scratch is None or scratch.numel() < param.numel() or scratch.device != param.device
            if hp.prune_option == "weight" and stale:  # |w| goes here; saliency scores are computed anew
                scratch = torch.empty(max(x.param.numel() for x in weights), device=param.device)
            if w.nm is not None:
                mask, threshold = self._nm_mask(w, self._scores(w, scratch), sparsities[w.name], target(w))
                commit(w, mask, threshold, finite[i])
                continue
            threshold, mask, _ = compute_mask(
                self._scores(w, scratch),
                w.threshold,
                sparsities[w.name],
                method=hp.threshold_method,
                nbins=hp.nbins,
                threshold_decay=hp.threshold_decay,
                block_dims=w.block_dims,
                pooling=hp.block_pooling_function,
                sort_count=hp.use_tpu,
                max_score=max_abs.to(torch.float32) if hp.prune_option == "weight" else None,
                out=target(w),
            )
            commit(w, mask, threshold, finite[i])
        if hp.use_tpu or defer:  # no second read back
            self._dense = dict.fromkeys(self._weights, False)
        else:
            if weights:  # the fused kernels counted theirs
                kept = torch.stack([torch.count_nonzero(w.mask) for w in weights]).tolist()  # cheaper than .all()
                kept_by_name.update(zip([w.name for w in weights], kept, strict=True))
            size = plan.sizes if plan else {}
            self._dense = {
                n: kept_by_name[n] == (size[n] if n in size else w.mask.numel()) for n, w in self._weights.items()
            }
        self.last_update_step = step
        if not all_fused:
            self._apply_masks(skip=fused_names, plan=plan)  # the fused kernels zeroed their weights already

    def _block_buffers(self, views: list[Tensor], dims: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """Pooled scores and block masks for the block kernels.

        Views of two buffers kept between updates: fresh ones would page-fault on every page the
        kernels write.  They hold 5 bytes per block.
        """
        grids = [cpu_kernels.block_grid(v.shape, d) for v, d in zip(views, dims, strict=True)]
        total = sum(r * c for r, c in grids)
        if self._block_scratch is None or self._block_scratch[0].numel() < total:
            self._block_scratch = (torch.empty(total, dtype=torch.float32), torch.empty(total, dtype=torch.bool))
        scores, flags = self._block_scratch
        pooled, block_masks, at = [], [], 0
        for r, c in grids:
            pooled.append(scores[at : at + r * c].view(r, c))
            block_masks.append(flags[at : at + r * c].view(r, c))
            at += r * c
        return pooled, block_masks

    def _block_plan(self, blocked: list[_Weight], live: dict[str, tuple[nn.Parameter, Tensor, Tensor]]) -> _BlockPlan:
        """The block kernels' views, buffers and checked batches, for the kernel plan that takes ``blocked``."""
        views = [live[w.name][0].detach().view(block_view_shape(live[w.name][0].shape)) for w in blocked]
        masks = [live[w.name][1].view(v.shape) for w, v in zip(blocked, views, strict=True)]
        dims = [resolve_block_dims(w.block_dims, v.shape) for w, v in zip(blocked, views, strict=True)]
        thresholds = [live[w.name][2] for w in blocked]
        pooled, block_masks = self._block_buffers(views, dims)
        fits = all(cpu_kernels.threshold_fits(t) for t in thresholds)
        return _BlockPlan(
            views=views,
            masks=masks,
            dims=dims,
            pooled=pooled,
            block_masks=block_masks,
            thresholds=thresholds,
            batch=cpu_kernels.BlockBatch(views, dims, masks, pooled, block_masks),
            scores=cpu_kernels.MagnitudeBatch(pooled, block_masks, thresholds) if fits else None,
        )

    def _raise_nonfinite(self, bad: list[_Weight], unchecked: list[_Weight], step: int) -> None:
        """Raise the ``FloatingPointError`` naming every non-finite pruned weight (``unchecked`` are checked here)."""
        if unchecked:
            flags = torch.stack([torch.isfinite(m) for m in _abs_maxima([w.param for w in unchecked])]).tolist()
            bad = bad + [w for w, ok in zip(unchecked, flags, strict=True) if not ok]
        order = list(self._weights)
        names = sorted((w.name for w in bad), key=order.index)
        raise FloatingPointError(f"NaN or Inf in pruned weight(s) {names} at step {step}; masks left unchanged")

    def _kernel_plan(self, weights: list[_Weight], joint_names: set[str]) -> _KernelPlan:
        """Which fused CPU kernels take each weight: the last update's plan while its tensors stay, else a new one.

        The tensors are looked up each time (``module.to()``, ``param.data = ...`` or a loaded
        mask replace them); equal data pointers mean the same storage, whose checks still hold.
        """
        hp = self.hparams
        live = {w.name: w.tensors() for w in weights}  # one lookup each
        pointers = [t.data_ptr() for tensors in live.values() for t in tensors]
        key = (hp.prune_option, hp.threshold_method, hp.nbins, tuple(joint_names))
        plan = self._plan
        if plan is not None and plan.key == key and plan.pointers == pointers and plan.live.keys() == live.keys():
            plan.live = live
            return plan
        kernel = {  # a mask of another shape (the model changed) is left to the eager path, which names it
            w.name: self._kernel_path(w, joint_names, *live[w.name])
            if live[w.name][0].shape == live[w.name][1].shape
            else None
            for w in weights
        }
        fused = [w for w in weights if kernel[w.name] == "elementwise"]
        applied = [  # apply_mask's kernel takes every float32 CPU weight with a bool mask of its size
            name
            for name, (param, mask, _) in live.items()
            if cpu_kernels.fits(param) and mask.dtype == torch.bool and mask.is_contiguous()
            and mask.numel() == param.numel()
        ]  # fmt: skip
        self._plan = _KernelPlan(
            key=key,
            pointers=pointers,
            live=live,
            kernel=kernel,
            fused=fused,
            blocked=[w for w in weights if kernel[w.name] == "block"],
            nm_fused=[w for w in weights if kernel[w.name] == "nm"],
            batch=cpu_kernels.MagnitudeBatch(*zip(*[live[w.name] for w in fused], strict=True)) if fused else None,
            sizes={name: t[1].numel() for name, t in live.items()},
            applied=applied,
            apply_batch=cpu_kernels.MaskBatch(*zip(*[live[n][:2] for n in applied], strict=True)) if applied else None,
        )
        return self._plan

    def _drop_plan(self) -> None:
        """Forget the kernel plan, which keeps the storage it was made for alive (the model left the CPU)."""
        self._plan = None

    def _kernel_path(
        self, w: _Weight, joint_names: set[str], param: Tensor, mask: Tensor, threshold: Tensor
    ) -> str | None:
        """Which fused CPU kernels update ``w``: ``"elementwise"``, ``"block"``, ``"nm"`` or ``None`` (eager).

        Magnitude pruning (``prune_option="weight"``) of a contiguous float32 CPU weight, not
        ranked jointly: N:M with M up to :data:`lit_prune.backends.cpu.kernels.NM_MAX_M`, or the histogram
        rule with ``nbins`` up to 65536 or the exact rule (element-wise: with a float32 CPU threshold,
        which the kernel reads and writes in place); ``None`` means the eager path.  The caller
        checks that the kernels can run at all.
        """
        hp = self.hparams
        if hp.prune_option != "weight" or w.name in joint_names:
            return None
        if not (cpu_kernels.fits(param) and mask.is_contiguous()):
            return None
        if w.nm is not None:
            return "nm" if w.nm[1] <= cpu_kernels.NM_MAX_M else None
        if not (hp.threshold_method == "exact" or hp.nbins <= _FUSED_MAX_NBINS):
            return None
        if w.block_dims == (1, 1) or block_view_shape(param.shape) is None:  # blocks need a 2-D view
            # The element-wise kernel reads and writes its float32 CPU threshold in place.
            return "elementwise" if cpu_kernels.threshold_fits(threshold) else None
        return "block"

    @staticmethod
    def _defer_checks(param: Tensor) -> bool:
        """Whether the NaN check is read back later instead of now: on accelerators (not CPU, not meta)."""
        return param.device.type not in ("cpu", "meta")

    def _queue_nonfinite_check(self, finite: Tensor, step: int, names: list[str]) -> None:
        host = torch.empty(finite.shape, dtype=torch.bool, pin_memory=finite.device.type == "cuda")
        host.copy_(finite, non_blocking=True)
        event = None
        if finite.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._pending_check = (host, event, step, names)

    def _raise_pending_nonfinite(self, wait: bool = True) -> None:
        """Raise for a NaN/Inf found by an earlier deferred check (``wait=False``: only if it is already read back)."""
        if self._pending_check is None:
            return
        host, event, step, names = self._pending_check
        if event is not None and not (wait or event.query()):
            return
        if event is not None:
            event.synchronize()
        self._pending_check = None
        if not bool(host.all()):
            bad = [n for n, ok in zip(names, host.tolist(), strict=True) if not ok]
            raise FloatingPointError(
                f"NaN or Inf in pruned weight(s) {bad} at the mask update of step {step}; their masks were left "
                "unchanged"
            )

    def _nm_mask(self, w: _Weight, scores: Tensor, sparsity: float, out: Tensor) -> tuple[Tensor, Tensor]:
        """N:M mask of ``w`` into ``out``: each group of M prunes ``floor(M * s)`` of its lowest scores.

        Returns ``(mask, threshold)``; the threshold is the largest pruned score (0 while nothing is pruned).
        """
        n, m = w.nm  # type: ignore[misc]
        mask = nm_mask(scores, m, nm_pruned_per_group(m, sparsity, n), out=out)
        return mask, torch.where(mask, 0.0, scores.to(torch.float32)).amax()

    def nm_weights(self) -> dict[str, tuple[int, int]]:
        """``{weight name: (N, M)}`` of the weights pruned N:M."""
        return {name: w.nm for name, w in self._weights.items() if w.nm is not None}

    def check_nm(self) -> None:
        """Raise ``ValueError`` unless every N:M weight is N:M sparse now (reads one value per N:M weight).

        Before the schedule reaches ``1 - N/M`` a 2:4 weight is still 3:4 or 4:4, and this says so.

        Example::

            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
            >>> p = Pruning(model, "nm_sparsity=2:4,sparsity_function_end_step=10")
            >>> p.check_nm()
            Traceback (most recent call last):
            ...
            ValueError: 0.weight is not 2:4 sparse: group 0 (row 0, input elements 0..3) holds 4 non-zeros
            >>> p.mask_update(10)
            >>> p.check_nm()
        """
        for name, (n, m) in self.nm_weights().items():
            check_nm_sparse(self._weights[name].param.detach(), n, m, name)

    def _check_model(self) -> None:
        """Fail clearly if a pruned weight was replaced or changed shape; warn once about weights added."""
        signature = _structure(self.model)
        if signature == self._model_signature:
            return  # same modules, parameter objects, shapes and trainability as at the last check
        params = dict(self.model.named_parameters())
        for w in self._weights.values():
            if params.get(w.name) is not w.param:
                raise ValueError(
                    f"pruned weight {w.name!r} was removed or replaced in the model after pruning was set up; "
                    "build a new Pruning/PruningCallback for the new model"
                )
            if w.param.shape != w.mask.shape:
                raise ValueError(
                    f"pruned weight {w.name!r} has shape {tuple(w.param.shape)} but its mask "
                    f"{tuple(w.mask.shape)}: the model changed after pruning was set up (structured pruning, a "
                    "replaced layer); build a new Pruning/PruningCallback for the new model"
                )
        hp = self.hparams
        try:
            now = select_weights(self.model, hp.prune_patterns, hp.exclude_patterns)
        except HParamsError:  # a pattern that matched at binding no longer does: nothing new to report
            return
        self._model_signature = signature
        new = [n for n in now if n not in self._weights and n not in self._warned_new]
        if new:
            self._warned_new.update(new)
            warnings.warn(
                f"weights {new} became candidates for pruning after it was set up (added to the model, or "
                "unfrozen) and are not pruned; build a new Pruning/PruningCallback to prune them",
                stacklevel=3,
            )

    def _scores(self, w: _Weight, scratch: Tensor | None = None) -> Tensor:
        """The scores ranked for ``w``: ``|w|`` (into ``scratch`` if given) or its saliency (advancing its state)."""
        hp, param = self.hparams, w.param.detach()
        if hp.prune_option != "weight":
            return update_saliency(param, w.saliency, hp.prune_option, hp.gradient_decay_rate)
        if scratch is None:
            return param.abs().to(torch.float32)
        scores = scratch[: param.numel()].view(param.shape)
        return torch.abs(param, out=scores) if param.dtype == torch.float32 else scores.copy_(param).abs_()

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the pruned weights in place (one pass over the weights and their 1-byte masks, no host sync).

        Call it after every optimizer step so pruned weights stay exactly zero; a step that runs
        :meth:`mask_update` (or an updating :meth:`conditional_mask_update`) needs no call, as the
        update applies the current masks itself.  Weights whose mask keeps everything (all of
        them before the first update) are skipped.
        """
        self._apply_masks()

    def _apply_masks(self, skip: frozenset[str] = frozenset(), plan: _KernelPlan | None = None) -> None:
        """Zero the pruned weights of every weight whose mask prunes something, but those in ``skip``.

        Float32 CPU weights go to the kernel in one call (``plan``: the caller's, checked already);
        the rest take one multiply each by the mask.
        """
        todo = {name for name in self._weights if not self._dense[name] and name not in skip}
        if todo and plan is None and cpu_kernels.available() and not torch.compiler.is_compiling():
            weights = list(self._weights.values())
            if self._defer_checks(weights[0].param):
                self._drop_plan()  # on an accelerator now: the plan's CPU storage is not kept alive
            else:
                plan = self._kernel_plan(weights, {w.name for w in self._joint()})
        if todo and plan is not None and plan.apply_batch is not None:
            which = [name in todo for name in plan.applied]
            if any(which):
                plan.apply_batch.apply(which)
                todo.difference_update(plan.applied)
        for name in todo:
            try:
                self._weights[name].param.detach().mul_(self._weights[name].mask.view(torch.uint8))
            except RuntimeError:
                self._check_model()  # names the weight whose shape changed
                raise
        self._raise_pending_nonfinite(wait=False)  # an accelerator's deferred NaN check, once read back

    def is_dense(self, name: str) -> bool:
        """Whether the mask of weight ``name`` keeps everything (as known since the last update or load)."""
        return self._dense[name]

    # ------------------------------------------------------------------ getters
    def get_masks(self) -> dict[str, Tensor]:
        """``{weight name: bool mask}`` (the live tensors; ``True`` = kept)."""
        return {name: w.mask for name, w in self._weights.items()}

    def get_thresholds(self) -> dict[str, Tensor]:
        """``{weight name: float32 0-d threshold}`` (the live tensors; in pooled space for block pruning)."""
        return {name: w.threshold for name, w in self._weights.items()}

    def get_weights(self) -> dict[str, nn.Parameter]:
        """``{weight name: parameter}`` of the pruned weights."""
        return {name: w.param for name, w in self._weights.items()}

    def get_masked_weights(self) -> dict[str, Tensor]:
        """``{weight name: weight * mask}`` (new tensors; equal to the weights after :meth:`apply_mask`)."""
        return {name: w.param.detach() * w.mask for name, w in self._weights.items()}

    def get_weight_sparsity(self) -> dict[str, Tensor]:
        """``{weight name: fraction of the mask that is zero}``, 0-d float32 tensors (TF's ``zero_fraction(mask)``)."""
        return {name: 1.0 - w.mask.float().mean() for name, w in self._weights.items()}

    def model_sparsity(self) -> Tensor:
        """Fraction of all pruned weights' elements that are masked (a 0-d float32 tensor)."""
        kept = sum(w.mask.sum() for w in self._weights.values())
        total = sum(w.mask.numel() for w in self._weights.values())
        return 1.0 - kept.to(torch.float32) / total  # type: ignore[union-attr]

    def summaries(self, step: int | None = None) -> dict[str, Tensor | float | int]:
        """The values TF's ``add_pruning_summaries`` recorded, under TF's tag names.

        ``<name>_summaries/sparsity`` (the scheduled global sparsity at ``step``, default the last
        update), ``<name>_summaries/last_mask_update_step``, and per weight
        ``<name>_summaries/<weight>/mask/sparsity`` and ``<name>_summaries/<weight>/threshold/threshold``.
        Per-weight values are 0-d tensors, so building the dict does not synchronise.
        """
        prefix = f"{self.hparams.name}_summaries"
        step = self.last_update_step if step is None else step
        out: dict[str, Tensor | float | int] = {
            f"{prefix}/sparsity": self.sparsity(step),
            f"{prefix}/last_mask_update_step": self.last_update_step,
        }
        thresholds = self.get_thresholds()
        for name, value in self.get_weight_sparsity().items():
            out[f"{prefix}/{name}/mask/sparsity"] = value
            out[f"{prefix}/{name}/threshold/threshold"] = thresholds[name]
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks, thresholds, saliency state and the last update step, as plain types (CPU tensors).

        Loadable with ``torch.load(..., weights_only=True)``.
        """
        return {
            "version": STATE_VERSION,
            "last_update_step": int(self.last_update_step),
            "masks": {n: m.detach().cpu().clone() for n, m in self.get_masks().items()},
            "thresholds": {n: t.detach().cpu().clone() for n, t in self.get_thresholds().items()},
            "saliency": {
                n: {k: v.detach().cpu().clone() for k, v in w.saliency.items()}
                for n, w in self._weights.items()
                if w.saliency
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the weights named must be the ones pruned here.

        Raises:
            ValueError: the state comes from another lit_prune version, lacks a key, names other
                weights, or holds a tensor of the wrong kind or shape; nothing is changed then.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"pruning state must be a mapping, got {type(state).__name__} (corrupted checkpoint?)")
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"pruning state version {version!r} is not supported (this lit_prune reads {STATE_VERSION}); "
                "it was written by another lit_prune version: strip it with that version, or re-run pruning"
            )
        missing_keys = sorted({"last_update_step", "masks", "thresholds"} - set(state))
        if missing_keys:
            raise ValueError(f"pruning state lacks {missing_keys} (corrupted checkpoint?)")
        masks, thresholds = state["masks"], state["thresholds"]
        if not isinstance(masks, Mapping) or not isinstance(thresholds, Mapping):
            raise ValueError("pruning state: `masks` and `thresholds` must map weight names to tensors")
        if set(masks) != set(self._weights) or set(thresholds) != set(self._weights):
            missing, extra = sorted(set(self._weights) - set(masks)), sorted(set(masks) - set(self._weights))
            raise ValueError(f"pruning state does not match the pruned weights: missing {missing}, unexpected {extra}")
        for name, w in self._weights.items():
            mask, threshold = masks[name], thresholds[name]
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"pruning state: mask of {name!r} must be a bool tensor, got {_describe(mask)}")
            if tuple(mask.shape) != tuple(w.param.shape):
                raise ValueError(
                    f"pruning state: mask of {name!r} has shape {tuple(mask.shape)}, "
                    f"the weight has {tuple(w.param.shape)}"
                )
            if not isinstance(threshold, Tensor) or threshold.numel() != 1 or not threshold.is_floating_point():
                raise ValueError(
                    f"pruning state: threshold of {name!r} must be a one-element float tensor, "
                    f"got {_describe(threshold)}"
                )
            expected = set(SALIENCY_STATE[self.hparams.prune_option])
            if expected and set(state.get("saliency", {}).get(name, {})) != expected:
                raise ValueError(f"pruning state: saliency of {name!r} must hold {sorted(expected)}")
        for name, w in self._weights.items():
            w.mask.copy_(masks[name].to(torch.bool))
            w.threshold.copy_(thresholds[name])
            for key, value in state.get("saliency", {}).get(name, {}).items():
                w.saliency[key].copy_(value)
        self.last_update_step = int(state["last_update_step"])
        self._dense = {name: bool(masks[name].all()) for name in self._weights}

    def __repr__(self) -> str:
        hp, n = self.hparams, len(self._weights)
        return f"Pruning(name={hp.name!r}, weights={n}, last_update_step={self.last_update_step})"
