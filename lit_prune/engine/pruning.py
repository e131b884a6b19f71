"""The ``Pruning`` object: TF's ``pruning.Pruning`` for a PyTorch module.

It binds a :class:`~lit_prune.PruningHParams` spec to the weights of a model (chosen by parameter
name), holds one ``torch.bool`` mask (1 byte per weight) and one float32 threshold per weight in
their one home (:mod:`~lit_prune.engine.state`), and offers TF's API in PyTorch form:
``conditional_mask_update(step)`` (TF's gating rule), ``mask_update(step)``, ``apply_mask()``,
the ``get_*`` getters, ``summaries()`` and ``state_dict()``/``load_state_dict()``.  Plain torch:
no Lightning, no Hydra.

A mask update is a pipeline over the groups of a plan (:mod:`~lit_prune.engine.plan`): the
current masks applied, the scores and their local statistics (``begin``), the check for NaN and
Inf, then the reduce step, the thresholds, the masks and zeros (``finish``), and the commit.

Unlike TF, which kept raw weights and multiplied them by the mask in every forward pass,
lit_prune zeroes pruned weights in place (no second copy of the weights, no forward hook).
A pruned weight is therefore 0 at the next update and ranks last, so masks do not regrow as
TF's could (TF re-ranked raw weights that momentum or weight decay kept moving).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lit_prune.backends.choose import choose_apply_backend, choose_backend
from lit_prune.backends.cpu import kernels
from lit_prune.config.hparams import HParamsError, PruningHParams
from lit_prune.engine.binding import ModelWatch, bind_weights, default_reducer, joint_names
from lit_prune.engine.checks import DeferredCheck, check_finite, nonfinite_error, record_kept
from lit_prune.engine.fsdp2 import fsdp2_modules, reshard
from lit_prune.engine.nm import check_nm_sparse
from lit_prune.engine.plan import Plan, UpdateRequest, build_plan, tensors_key
from lit_prune.engine.reduce import Reducer
from lit_prune.engine.saliency import SALIENCY_STATE
from lit_prune.engine.schedule import external_scale, gradual_sparsity, should_update, weight_sparsity
from lit_prune.engine.scratch import Scratch
from lit_prune.engine.sharding import is_sharded, kept_counts
from lit_prune.engine.state import check_saved_state, load_states, save_states
from lit_prune.engine.summaries import tf_summaries

__all__ = ["STATE_VERSION", "Pruning", "SparsityFn"]

#: Version of the ``state_dict`` layout; bumped when it changes.
STATE_VERSION = 1

SparsityFn = Callable[[int], float]


class Pruning:
    """Magnitude-based gradual pruning of a module's weights, with TF's semantics.

    Args:
        model: The module whose weights are pruned.  Weights are chosen by parameter name (see
            ``prune_patterns``/``exclude_patterns``); masked layers bring their own mask buffers.
        hparams: A :class:`PruningHParams`, a plain mapping of its fields, a TF-style
            ``"name=value,..."`` string, or ``None`` for TF's defaults.
        sparsity: Overrides the schedule, as TF's ``Pruning(spec, sparsity=...)``: a number or a
            callable of the step.  It is still scaled per weight by ``weight_sparsity_map``.
        reducer: Where statistics of weights split across processes are combined (the reduce
            step).  The default combines nothing for whole weights (one process, DDP) and
            all-reduces over the device mesh of sharded (``DTensor``) weights, e.g. FSDP2's.

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
        *,
        reducer: Reducer | None = None,
    ) -> None:
        self.hparams = PruningHParams.coerce(hparams)
        kernels.native_enabled()  # a misspelt LIT_PRUNE_NATIVE fails here, before any training
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
        self._fsdp2 = fsdp2_modules(model)
        reshard(self._fsdp2)  # bound to the sharded parameters, even after a forward left them unsharded
        self._states = bind_weights(model, self.hparams)
        self.reducer: Reducer = reducer or default_reducer(self._states)
        if sparsity is not None:  # an external sparsity scales per own target: checked now, not at step 1
            for s in self._states.values():
                if s.spec.target is not None:
                    external_scale(self.hparams, s.spec.target)
        self._joint = joint_names(self._states, self.hparams)
        self._watch = ModelWatch(model, self.hparams)
        self._deferred = DeferredCheck()
        self._scores, self._staging = Scratch(torch.float32), Scratch(torch.bool)
        self._counting = Scratch(torch.float32), Scratch(torch.int32)
        self._plan: Plan | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What pickling and ``copy.deepcopy`` keep: everything but the plan (raw pointers, rebuilt at need)."""
        state = self.__dict__.copy()
        state["_plan"] = None
        return state

    @property
    def weight_names(self) -> list[str]:
        """Names (as ``model.named_parameters()`` gives them) of the pruned weights."""
        return list(self._states)

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
            name: global_value if s.spec.target is None else weight_sparsity(step, self.hparams, s.spec.target, base)
            for name, s in self._states.items()
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

        The current masks are applied first, so the update ranks the weights the model uses: a
        weight pruned before is 0 and ranks last, even if an optimizer step moved it since.  A
        training loop therefore needs :meth:`apply_mask` only on the steps that do not update.

        On the CPU the update reads two small vectors back for the whole model (whether each
        weight is finite, and how many elements each mask keeps).  On an accelerator it
        synchronises nothing: a non-finite weight keeps its old mask and threshold, and the
        error is raised by the first :meth:`apply_mask` (or update) that finds the flags copied
        back.  With ``use_tpu`` it reads nothing back at all (and so cannot check for NaN).

        Raises:
            FloatingPointError: a weight holds NaN or Inf; it is named, and no mask is changed
                (the current masks may have been applied, and the saliency state of ``*_gradient``
                options has advanced by then).  On an accelerator this comes from a later call.
            ValueError: a pruned weight was replaced or changed shape since binding (e.g. after
                structured pruning).  Weights added to the model (or unfrozen) since binding are
                not pruned; a warning names them once.
        """
        self._follow_model(check=True)
        self._deferred.raise_if_failed()
        deferred = self._deferred_now()
        plan = self._current_plan(deferred)
        request = UpdateRequest(
            step=step,
            sparsities=self.weight_sparsities(step),
            hparams=self.hparams,
            deferred=deferred,
            scores=self._scores,
            staging=self._staging,
            counting=self._counting,
        )
        try:
            begun = [group.backend.begin(group, request) for group in plan.groups]  # masks, scores, statistics
            check_finite(plan.groups, begun, request, self._deferred)  # NaN/Inf: now, or read back later
            results = [g.backend.finish(g, b, request) for g, b in zip(plan.groups, begun, strict=True)]
        except FloatingPointError:  # found before any mask changed: name every non-finite weight
            raise nonfinite_error(list(self._states.values()), step) from None
        record_kept(plan.groups, results, known=not (request.deferred or self.hparams.use_tpu))
        self.last_update_step = step

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the pruned weights in place (one pass over the weights and their 1-byte masks, no host sync).

        Call it after every optimizer step so pruned weights stay exactly zero; a step that runs
        :meth:`mask_update` (or an updating :meth:`conditional_mask_update`) needs no call, as the
        update applies the current masks itself.  Weights whose mask keeps everything (all of
        them before the first update) are skipped.
        """
        self._follow_model(check=False)
        try:
            for group in self._current_plan(self._deferred_now()).apply_groups:
                group.backend.apply(group)
        except RuntimeError:
            self._watch.check(self._states)  # names the weight whose shape changed
            raise
        self._deferred.raise_if_failed(wait=False)  # an accelerator's deferred NaN check, once read back

    def _follow_model(self, check: bool) -> None:
        """The state follows its weights (masked layers' buffers, device moves); ``check``: check the model too."""
        reshard(self._fsdp2)  # FSDP2: the sharded parameters, as bound (a validation forward may have swapped them)
        for s in self._states.values():
            s.follow()
        if check:
            self._watch.check(self._states)

    def _deferred_now(self) -> bool:
        """Whether this update's NaN check is deferred: some weight is on an accelerator."""
        return any(self._defer_checks(s.param) for s in self._states.values())

    @staticmethod
    def _defer_checks(param: Tensor) -> bool:
        """Whether the NaN check is read back later instead of now: on accelerators (not CPU, not meta)."""
        return param.device.type not in ("cpu", "meta")

    def _current_plan(self, deferred: bool) -> Plan:
        """The plan for the tensors as they are now: the last one while they stay, else a new one."""
        states = list(self._states.values())
        if self._plan is None or self._plan.key != (deferred, tensors_key(states)):
            self._plan = None  # let the old plan's buffers go before the new one is made
            self._plan = build_plan(
                states, self.hparams, self.reducer, self._joint, choose_backend, choose_apply_backend, deferred
            )
        return self._plan

    def weight_targets(self) -> dict[str, float]:
        """Each pruned weight's final sparsity: its own (map entry, ``allocation``, N:M) or ``target_sparsity``."""
        default = self.hparams.target_sparsity
        return {n: default if s.spec.target is None else s.spec.target for n, s in self._states.items()}

    def is_dense(self, name: str) -> bool:
        """Whether the mask of weight ``name`` keeps everything (as known since the last update or load)."""
        return self._states[name].dense

    # ------------------------------------------------------------------ N:M
    def nm_weights(self) -> dict[str, tuple[int, int]]:
        """``{weight name: (N, M)}`` of the weights pruned N:M."""
        return {name: s.spec.nm for name, s in self._states.items() if s.spec.nm is not None}

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
            check_nm_sparse(self._states[name].param.detach(), n, m, name, self._states[name].spec.input_dims)

    # ------------------------------------------------------------------ getters
    def get_masks(self) -> dict[str, Tensor]:
        """``{weight name: bool mask}`` (the live tensors, on their weights' devices; ``True`` = kept)."""
        self._follow_model(check=False)
        return {name: s.mask for name, s in self._states.items()}

    def get_thresholds(self) -> dict[str, Tensor]:
        """``{weight name: float32 0-d threshold}`` (the live tensors; in pooled space for block pruning)."""
        self._follow_model(check=False)
        return {name: s.threshold for name, s in self._states.items()}

    def get_weights(self) -> dict[str, nn.Parameter]:
        """``{weight name: parameter}`` of the pruned weights."""
        return {name: s.param for name, s in self._states.items()}

    def get_masked_weights(self) -> dict[str, Tensor]:
        """``{weight name: weight * mask}`` (new tensors; equal to the weights after :meth:`apply_mask`)."""
        masks = self.get_masks()
        return {name: s.param.detach() * masks[name] for name, s in self._states.items()}

    def get_weight_sparsity(self) -> dict[str, Tensor]:
        """``{weight name: fraction of the mask that is zero}``, 0-d float32 tensors (TF's ``zero_fraction(mask)``).

        A sharded mask's fraction comes from its kept count summed over the processes (one
        all-reduce for all of them): the same on every process.
        """
        masks = self.get_masks()
        if not any(is_sharded(m) for m in masks.values()):
            return {name: 1.0 - mask.float().mean() for name, mask in masks.items()}
        kept = kept_counts(list(masks.values()), self.reducer)
        return {n: 1.0 - k.to(torch.float32) / m.numel() for (n, m), k in zip(masks.items(), kept, strict=True)}

    def model_sparsity(self) -> Tensor:
        """Fraction of all pruned weights' elements that are masked (a 0-d float32 tensor)."""
        masks = list(self.get_masks().values())
        kept = torch.stack(kept_counts(masks, self.reducer)).sum()
        return 1.0 - kept.to(torch.float32) / sum(m.numel() for m in masks)

    def summaries(self, step: int | None = None) -> dict[str, Tensor | float | int]:
        """The values TF's ``add_pruning_summaries`` recorded, under TF's tag names (see :func:`tf_summaries`)."""
        return tf_summaries(self, step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks, thresholds, saliency state and the last update step, as plain types (CPU tensors).

        Loadable with ``torch.load(..., weights_only=True)``.
        """
        self._follow_model(check=False)
        return {"version": STATE_VERSION, "last_update_step": int(self.last_update_step), **save_states(self._states)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the weights named must be the ones pruned here.

        Raises:
            ValueError: the state comes from another lit_prune version, lacks a key, names other
                weights, or holds a tensor of the wrong kind or shape; nothing is changed then.
        """
        self._follow_model(check=False)
        check_saved_state(self._states, state, STATE_VERSION, SALIENCY_STATE[self.hparams.prune_option])
        load_states(self._states, state)
        self.last_update_step = int(state["last_update_step"])

    def __repr__(self) -> str:
        hp, n = self.hparams, len(self._states)
        return f"Pruning(name={hp.name!r}, weights={n}, last_update_step={self.last_update_step})"
