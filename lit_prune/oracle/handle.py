"""HALCON's deep-learning pruning operators for PyTorch: score kernels on your data, remove the lowest.

HALCON                                              lit_prune (functions)               lit_prune (object)
``create_dl_pruning(Model, 'oracle', GenParam)``    ``create_dl_pruning(model, ...)``   ``OraclePruning(model, ...)``
``set_dl_pruning_param(Handle, Name, Value)``       ``set_dl_pruning_param(...)``       ``.set_param(name, value)``
``get_dl_pruning_param(Handle, Name)``              ``get_dl_pruning_param(...)``       ``.get_param(name)``
``add_dl_pruning_batch(Model, Handle, Batch)``      ``add_dl_pruning_batch(...)``       ``.add_batch(batch)``
``gen_dl_pruned_model(Model, Handle)``              ``gen_dl_pruned_model(...)``        ``.gen_pruned_model()``

Mode ``'oracle'`` (HALCON's only mode) ranks the kernels of convolution layers by their importance
to the loss on the batches given, removes the lowest ``'percentage'`` of the *prunable* kernels
(every conv keeps at least one) and returns a physically smaller copy of the model, a plain
``nn.Module`` that runs and saves without lit_prune.  The score is ``'taylor'`` by default: the
first-order Taylor approximation of the oracle from Molchanov et al. (ICLR 2017, Eq. 8), which the
paper found to track the exact oracle best among cheap criteria and which costs one backward pass
per batch; ``'exact'`` is the oracle itself (the loss change when each kernel is removed: one
forward pass per kernel per batch, for small models); ``'l1'`` and ``'random'`` are baselines.
By default every layer loses the same share of its kernels (the lowest-scored ones), which shrinks
the network evenly and speeds it up predictably; ``'ranking': 'global'`` is the paper's single
ranking over all layers, with its per-layer L2 normalisation (Section 2.3).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lit_prune.oracle.scores import (
    TaylorScores,
    exact_oracle,
    l1_scores,
    l2_normalize_per_group,
    random_scores,
    select_removals,
)
from lit_prune.oracle.surgery import (
    KernelGroup,
    StructuredPruningError,
    build_groups,
    count_macs_and_params,
    prune_groups,
)

__all__ = [
    "OraclePruning",
    "add_dl_pruning_batch",
    "create_dl_pruning",
    "gen_dl_pruned_model",
    "get_dl_pruning_param",
    "set_dl_pruning_param",
]

MODES = ("oracle",)
SCORES = ("taylor", "exact", "l1", "random")
#: Parameters that may be set (HALCON's plus lit_prune's), with their defaults.
SETTABLE: dict[str, Any] = {"percentage": 10.0, "score": "taylor", "ranking": "per_layer", "normalize": True, "seed": 0}
RANKINGS = ("global", "per_layer")
#: Read-only figures (HALCON's, plus parameter and MAC counts).
READ_ONLY = (
    "mode",
    "prunable_conv_num",
    "prunable_conv_layer_name",
    "prunable_kernel_num",
    "pruned_kernel_num",
    "pruned_percentage",
    "num_params",
    "num_params_pruned",
    "macs",
    "macs_pruned",
    "scored_samples",
)


class OraclePruning:
    """A pruning handle (HALCON ``DLPruningHandle``) for one model.

    Args:
        model: The trained classification model (it is never modified; :meth:`gen_pruned_model`
            returns a pruned copy).
        mode: ``'oracle'``.
        gen_param: Initial settable parameters: ``percentage`` (of the prunable kernels to remove,
            in (0, 100); default 10), ``score`` (``'taylor'``, ``'exact'``, ``'l1'``,
            ``'random'``), ``ranking`` (``'per_layer'``, the default: the same share from every
            layer, lowest scores first; ``'global'``: the paper's one ranking over all layers, which
            on digits kept the costly late layers wide and gave 1.3x instead of 2x speed-up),
            ``normalize`` (per-layer L2 normalisation, for the global ranking; default on), ``seed``
            (of ``'random'``).
        loss_fn: The loss the scores refer to (default: cross-entropy).
        example_inputs: An input batch to trace the model with; taken from the first
            :meth:`add_batch` if not given.

    Raises:
        StructuredPruningError: an unknown mode or parameter, a bad value, an unsupported layer.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                       nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))
        >>> handle = OraclePruning(model, "oracle", {"percentage": 50})
        >>> handle.add_batch((torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))))
        >>> handle.get_param("prunable_kernel_num")
        16
        >>> pruned = handle.gen_pruned_model()
        >>> handle.get_param("pruned_kernel_num"), pruned[0].out_channels + pruned[3].out_channels
        (8, 8)
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "oracle",
        gen_param: Mapping[str, Any] | None = None,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
        example_inputs: Tensor | None = None,
    ) -> None:
        if mode not in MODES:
            raise StructuredPruningError(f"`mode` must be one of {list(MODES)}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.loss_fn = loss_fn
        self.params: dict[str, Any] = dict(SETTABLE)
        for name, value in (gen_param or {}).items():
            self.set_param(name, value)
        self._example: Tensor | None = None
        self.groups: list[KernelGroup] = []
        self._taylor: TaylorScores | None = None
        self._oracle: dict[str, Tensor] = {}
        self._samples = 0
        self._result: dict[str, Any] = {}
        if example_inputs is not None:
            self._trace(example_inputs)

    # ------------------------------------------------------------------ parameters
    def set_param(self, name: str, value: Any) -> None:
        """HALCON's ``set_dl_pruning_param``; read-only and unknown names raise, values are checked."""
        if name in READ_ONLY:
            raise StructuredPruningError(f"`{name}` is read-only; settable: {list(SETTABLE)}")
        if name not in SETTABLE:
            raise StructuredPruningError(f"unknown pruning parameter {name!r}; settable: {list(SETTABLE)}")
        if name == "percentage":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < float(value) < 100:
                raise StructuredPruningError(f"`percentage` must be a number in (0, 100), got {value!r}")
            value = float(value)
        elif name == "score" and value not in SCORES:
            raise StructuredPruningError(f"`score` must be one of {list(SCORES)}, got {value!r}")
        elif name == "ranking" and value not in RANKINGS:
            raise StructuredPruningError(f"`ranking` must be one of {list(RANKINGS)}, got {value!r}")
        elif name == "normalize" and not isinstance(value, bool):
            raise StructuredPruningError(f"`normalize` must be a bool, got {value!r}")
        elif name == "seed" and (isinstance(value, bool) or not isinstance(value, int)):
            raise StructuredPruningError(f"`seed` must be an int, got {value!r}")
        self.params[name] = value

    def get_param(self, name: str) -> Any:
        """HALCON's ``get_dl_pruning_param``: a settable value or a read-only figure."""
        if name in SETTABLE:
            return self.params[name]
        if name == "mode":
            return self.mode
        if name == "scored_samples":
            return self._samples
        if name in ("num_params", "macs"):
            self._need_trace()
            macs, params = count_macs_and_params(self.model, self._example)  # type: ignore[arg-type]
            return params if name == "num_params" else macs
        if name.startswith("prunable_"):
            self._need_trace()
            return {
                "prunable_conv_num": len(self.groups),
                "prunable_conv_layer_name": [g.name for g in self.groups],
                "prunable_kernel_num": sum(g.channels for g in self.groups),
            }[name]
        if name in READ_ONLY:
            if not self._result:
                raise StructuredPruningError(f"`{name}` is known after gen_pruned_model()")
            return self._result[name]
        raise StructuredPruningError(f"unknown pruning parameter {name!r}; known: {list(SETTABLE) + list(READ_ONLY)}")

    # ------------------------------------------------------------------ scoring
    def _trace(self, example_inputs: Tensor) -> None:
        self._example = example_inputs[:1].detach()
        _, self.groups = build_groups(self.model, self._example)
        self._taylor = TaylorScores(self.model, self.groups)

    def _need_trace(self) -> None:
        if self._example is None:
            raise StructuredPruningError("add a batch with add_batch() first (or pass `example_inputs`)")

    def add_batch(self, batch: tuple[Tensor, Tensor] | Mapping[str, Tensor]) -> None:
        """HALCON's ``add_dl_pruning_batch``: score the kernels on one batch and add to the totals.

        ``batch`` is ``(inputs, labels)`` or ``{"image": ..., "label": ...}``.  The model runs in eval
        mode (BatchNorm statistics frozen), its parameters' ``.grad`` are left untouched.
        """
        x, y = (batch["image"], batch["label"]) if isinstance(batch, Mapping) else batch
        if self._example is None:
            self._trace(x)
        assert self._taylor is not None
        was_training = self.model.training
        self.model.eval()
        try:
            if self.params["score"] == "exact":
                for name, delta in exact_oracle(self.model, self.groups, (x, y), self.loss_fn).items():
                    self._oracle[name] = self._oracle.get(name, 0) + delta
            else:
                with torch.enable_grad(), self._taylor:
                    x = x.detach()
                    outputs: list[Tensor] = []
                    handles = [
                        m.register_forward_hook(lambda _m, _a, out: outputs.append(out))
                        for n, m in self.model.named_modules()
                        if any(n in g.gates for g in self.groups)
                    ]
                    try:
                        loss = self.loss_fn(self.model(x), y)
                    finally:
                        for h in handles:
                            h.remove()
                    torch.autograd.grad(loss, [o for o in outputs if o.requires_grad], allow_unused=True)
                self._taylor.end_batch()
        finally:
            self.model.train(was_training)
        self._samples += int(x.shape[0])

    def scores(self) -> dict[str, Tensor]:
        """The current per-group kernel scores under the chosen ``score`` (normalised if ``normalize``)."""
        self._need_trace()
        kind = self.params["score"]
        if kind in ("taylor", "exact") and self._samples == 0:
            raise StructuredPruningError(f"score {kind!r} needs data: call add_batch() first")
        if kind == "taylor":
            assert self._taylor is not None
            raw = self._taylor.scores()
        elif kind == "exact":
            raw = {g.name: self._oracle[g.name].abs() / self._samples for g in self.groups}
        elif kind == "l1":
            raw = l1_scores(self.model, self.groups)
        else:
            return random_scores(self.groups, self.params["seed"])
        return l2_normalize_per_group(raw) if self.params["normalize"] else raw

    # ------------------------------------------------------------------ pruning
    def gen_pruned_model(self) -> nn.Module:
        """HALCON's ``gen_dl_pruned_model``: a copy of the model with the lowest-scored kernels removed.

        Raises:
            StructuredPruningError: no batch seen (for data-driven scores), or a percentage that
                would take every kernel of a layer.
        """
        scores = self.scores()
        total = sum(g.channels for g in self.groups)
        count = round(self.params["percentage"] / 100 * total)
        removals = select_removals(scores, count, per_layer=self.params["ranking"] == "per_layer")
        pruned = copy.deepcopy(self.model)
        example = self._example
        assert example is not None
        prune_groups(pruned, example, removals)
        macs, params = count_macs_and_params(self.model, example)
        macs_pruned, params_pruned = count_macs_and_params(pruned, example)
        removed = sum(len(v) for v in removals.values())
        self._result = {
            "pruned_kernel_num": removed,
            "pruned_percentage": 100.0 * removed / total,
            "num_params_pruned": params_pruned,
            "macs_pruned": macs_pruned,
            "removed": removals,
        }
        self._result.setdefault("num_params", params)
        self._result.setdefault("macs", macs)
        pruned.train(self.model.training)
        return pruned

    @property
    def removed(self) -> dict[str, list[int]]:
        """``{group name: removed channel indices}`` of the last :meth:`gen_pruned_model`."""
        if not self._result:
            raise StructuredPruningError("nothing removed yet: call gen_pruned_model() first")
        return self._result["removed"]


def create_dl_pruning(
    model: nn.Module, mode: str = "oracle", gen_param: Mapping[str, Any] | None = None, **kwargs: Any
) -> OraclePruning:
    """HALCON's ``create_dl_pruning``: a pruning handle for ``model`` (see :class:`OraclePruning`)."""
    return OraclePruning(model, mode, gen_param, **kwargs)


def set_dl_pruning_param(handle: OraclePruning, name: str, value: Any) -> None:
    """HALCON's ``set_dl_pruning_param``."""
    handle.set_param(name, value)


def get_dl_pruning_param(handle: OraclePruning, name: str) -> Any:
    """HALCON's ``get_dl_pruning_param``."""
    return handle.get_param(name)


def add_dl_pruning_batch(model: nn.Module, handle: OraclePruning, batch: Any) -> None:
    """HALCON's ``add_dl_pruning_batch(Model, Handle, Batch)``: the model must be the handle's."""
    if model is not handle.model:
        raise StructuredPruningError("`model` must be the model the pruning handle was created for")
    handle.add_batch(batch)


def gen_dl_pruned_model(model: nn.Module, handle: OraclePruning) -> nn.Module:
    """HALCON's ``gen_dl_pruned_model(Model, Handle)``: a pruned copy of ``model``."""
    if model is not handle.model:
        raise StructuredPruningError("`model` must be the model the pruning handle was created for")
    return handle.gen_pruned_model()
