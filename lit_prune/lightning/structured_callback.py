"""``StructuredPruningCallback``: Molchanov et al.'s iterative prune-and-fine-tune loop inside ``Trainer.fit``.

While training, the Taylor criterion of every kernel accumulates from the training batches' own
backward passes (tensor hooks on the layers' outputs, whatever the batch looks like; nothing is
stored beyond a batch).  With the last batch of each epoch listed in ``prune_at_epochs`` (before
that epoch's validation and checkpoint) the lowest-scored ``percentage`` of the prunable kernels
are removed from the ``LightningModule`` in place (Torch-Pruning surgery: BatchNorm channels, next
layers' inputs, residual and depthwise partners), the optimizers and schedulers are rebuilt
through Lightning (``configure_optimizers`` runs again, so its state restarts), scores restart,
and fine-tuning goes on.

* **Tracing** needs one forward call of the module: ``example_inputs`` if given, else the module's
  ``example_input_array``, else the first call of ``pl_module(...)`` (a forward pre-hook), cut to
  one example.
* **DDP** (``ddp``, ``ddp_spawn``): the scores are summed over ranks, rank 0 chooses the kernels
  and broadcasts its choice, so every rank cuts the same ones; the DDP wrapper is rebuilt around
  the smaller module.  With ``ddp_spawn`` the main process gets the workers' smaller weights
  through a load hook that :meth:`StructuredPruningCallback.attach` puts on the module first.
* **Magnitude pruning**: a :class:`~lit_prune.PruningCallback` in the same ``Trainer`` is rebound
  to the smaller model after each removal, as long as its masks keep every weight (its schedule
  begins after the last structured epoch); otherwise the removal is refused, before any change.
* **Resume**: the callback puts a load-state-dict pre-hook on the module in ``setup``, which
  resizes its layers to the shapes of the weights Lightning loads (``fit``/``validate``/``test``
  with ``ckpt_path``), so a fresh module takes a pruned checkpoint; the removal history is in
  the checkpoint.  The module's own hooks (``on_load_checkpoint`` included) are left alone.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lit_prune.lightning.pruning_callback import PruningCallback, shards_parameters
from lit_prune.oracle.handle import RANKINGS
from lit_prune.oracle.scores import TaylorScores, l1_scores, l2_normalize_per_group, random_scores, select_removals
from lit_prune.oracle.surgery import (
    KernelGroup,
    ModelInputs,
    StructuredPruningError,
    build_groups,
    count_macs_and_params,
    prune_groups,
    resize_to_state_dict,
)

__all__ = ["StructuredPruningCallback"]

#: The kernel criteria (``score``).
Score = Literal["taylor", "l1", "random"]
#: How the kernels are ranked (``ranking``): :data:`~lit_prune.oracle.handle.RANKINGS`.
Ranking = Literal[RANKINGS]  # type: ignore[valid-type]
_SCORES: tuple[str, ...] = get_args(Score)
#: The module attribute that holds its resize-on-load hook (it travels with the module to spawned workers).
_HOOK_ATTRIBUTE = "_lit_prune_resize_on_load"


class _ResizeOnLoad:
    """Load-state-dict pre-hook: resize the module's layers to the incoming shapes (picklable)."""

    def __init__(self) -> None:
        self.resized: list[str] = []  # layers resized by loads since the callback last looked

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.resized += resize_to_state_dict(module, state_dict, prefix)


def _register(module: nn.Module) -> RemovableHandle:
    hook = _ResizeOnLoad()
    handle = module.register_load_state_dict_pre_hook(hook)
    setattr(module, _HOOK_ATTRIBUTE, hook)
    return handle


class StructuredPruningCallback(Callback):
    """Iterative structured (kernel) pruning with the Taylor criterion, as a Lightning callback.

    Args:
        percentage: Share of the currently prunable kernels removed at each pruning epoch, in (0, 100).
        prune_at_epochs: Epochs at whose end kernels are removed (0-based).
        score: ``'taylor'`` (accumulated from the training batches), ``'l1'`` or ``'random'``.
        ranking: ``'per_layer'`` (the same share from every layer) or ``'global'``.
        log_histograms: Write a histogram of the scores to a TensorBoard logger at each removal.
        example_inputs: What the module is traced with, for a module whose ``training_step`` never
            calls ``self(...)``: a tensor (``pl_module(x)``), a tuple of positional arguments, a dict
            of keyword arguments or a :class:`~lit_prune.oracle.surgery.ModelInputs`.  Default: the
            module's ``example_input_array``, else the first call of ``pl_module(...)``.

    Raises:
        StructuredPruningError: a bad argument (at construction); in training, no way to trace the
            module, a removal that would empty a layer, or a ``PruningCallback`` whose masks
            already prune when kernels are due to go (order the schedules).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lit_prune import PruningCallback
        >>> cb = StructuredPruningCallback(percentage=30, prune_at_epochs=[4, 8])
        >>> gradual = PruningCallback(target_sparsity=0.8, begin_pruning_step=2000, end_pruning_step=4000)
        >>> trainer = Trainer(callbacks=[cb, gradual], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        percentage: float = 25.0,
        prune_at_epochs: list[int] | tuple[int, ...] = (5,),
        score: Score = "taylor",
        ranking: Ranking = "per_layer",
        log_histograms: bool = True,
        example_inputs: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(percentage, bool) or not isinstance(percentage, int | float) or not 0 < percentage < 100:
            raise StructuredPruningError(f"`percentage` must be a number in (0, 100), got {percentage!r}")
        epochs = list(prune_at_epochs)
        if not epochs or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs):
            raise StructuredPruningError(
                f"`prune_at_epochs` must be a non-empty list of ints >= 0, got {prune_at_epochs!r}"
            )
        if score not in _SCORES:
            raise StructuredPruningError(f"`score` must be one of {list(_SCORES)}, got {score!r}")
        if ranking not in RANKINGS:
            raise StructuredPruningError(f"`ranking` must be one of {list(RANKINGS)}, got {ranking!r}")
        self.percentage = float(percentage)
        self.prune_at_epochs = sorted(set(epochs))
        self.score = score
        self.ranking = ranking
        self.log_histograms = log_histograms
        self.example_inputs = example_inputs
        self.history: list[dict[str, list[int]]] = []  # removed channels per group, per removal step
        self.pruned_epochs: list[int] = []  # the epoch of each removal step
        self.groups: list[KernelGroup] = []
        self._example: ModelInputs | None = None  # what the module is traced with (one example once traced)
        self._taylor: TaylorScores | None = None
        self._capture: RemovableHandle | None = None
        self._load_hook: RemovableHandle | None = None  # the resize-on-load hook put on the module in setup

    # ------------------------------------------------------------------ loading pruned weights
    @staticmethod
    def attach(module: nn.Module) -> nn.Module:
        """Let ``module.load_state_dict`` take a structurally pruned model's weights; returns ``module``.

        Puts a load-state-dict pre-hook on ``module`` that resizes its layers to the shapes of the
        weights being loaded (:func:`~lit_prune.oracle.surgery.resize_to_state_dict`).  The
        callback does this itself in ``setup``; call it yourself before ``trainer.fit`` with
        ``strategy='ddp_spawn'`` (Lightning loads the spawned workers' weights into the main
        process's module, and no callback hook runs there), or to load a pruned checkpoint outside
        a ``Trainer``.

        Example::

            >>> from torch import nn
            >>> model = StructuredPruningCallback.attach(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 2, 1)))
            >>> model.load_state_dict(nn.Sequential(nn.Conv2d(1, 5, 3), nn.Conv2d(5, 2, 1)).state_dict())
            <All keys matched successfully>
            >>> model[0].out_channels, model[1].in_channels
            (5, 5)
        """
        if getattr(module, _HOOK_ATTRIBUTE, None) is None:
            _register(module)
        return module

    # ------------------------------------------------------------------ setup and teardown
    @staticmethod
    def check_strategy(strategy: object) -> None:
        """Raise ``StructuredPruningError`` for a strategy that shards parameters (run at ``setup``)."""
        if shards_parameters(strategy):
            raise StructuredPruningError(
                f"StructuredPruningCallback does not support `{type(strategy).__name__}`: it removes kernels from "
                "the modules, which sharded parameters cannot follow. Prune structurally first, on one device or with "
                "`strategy='ddp'`, then shard the smaller model (`PruningCallback` works under sharding)"
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_strategy(trainer.strategy)
        hook = getattr(pl_module, _HOOK_ATTRIBUTE, None)
        if hook is not None:  # put there by `attach`: count only this run's loads
            hook.resized = []
        else:
            launcher = getattr(trainer.strategy, "launcher", None)
            if stage == "fit" and type(launcher).__name__ == "_MultiProcessingLauncher":
                raise StructuredPruningError(
                    f"StructuredPruningCallback with a spawning strategy (`{type(trainer.strategy).__name__}`, start "
                    f"method {getattr(launcher, '_start_method', '?')!r}): Lightning loads the workers' trained, "
                    "smaller weights into the main process's module, where no callback runs. Call "
                    "`StructuredPruningCallback.attach(model)` before `trainer.fit` (it lets the module take them), "
                    "or use `strategy='ddp'`"
                )
            self._load_hook = _register(pl_module)  # resizes the module to a pruned checkpoint's weights
        self._taylor, self.groups = None, []
        if stage != "fit":
            return
        if self.example_inputs is not None:
            self._example = ModelInputs.of(self.example_inputs)
        elif getattr(pl_module, "example_input_array", None) is not None:
            self._example = ModelInputs.of(pl_module.example_input_array)
        else:  # this module's first own call
            self._example = None
            self._capture = pl_module.register_forward_pre_hook(self._capture_hook(), with_kwargs=True)

    def _capture_hook(self) -> Any:
        # A closure, not a bound method: Torch-Pruning deep-copies the module, hooks included.
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            # Under DDP, Lightning routes `training_step(batch, batch_idx)` through the wrapper by setting
            # another `forward` on the instance for one call: not the module's own call, which comes next.
            patched = vars(module).get("forward")
            own = patched is None or getattr(patched, "__func__", None) is type(module).forward
            if self._example is None and own:
                self._example = ModelInputs(args, kwargs).map(lambda t: t.detach())

        return hook

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._taylor is not None:
            self._taylor.__exit__()
            self._taylor = None
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
            if _HOOK_ATTRIBUTE in vars(pl_module):
                delattr(pl_module, _HOOK_ATTRIBUTE)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs after the weights were loaded (and the layers resized) and before any callback's state
        # is: magnitude-pruning engines bound to the layers before the resize are bound anew, so that
        # they take the checkpoint's masks next.
        hook = getattr(pl_module, _HOOK_ATTRIBUTE, None)
        if hook is None or not hook.resized:
            return
        rank_zero_info(f"StructuredPruningCallback: resized {len(hook.resized)} layers to the checkpoint's weights")
        hook.resized = []
        for callback in _magnitude_callbacks(trainer):
            callback.rebind(pl_module, discard_masks=True)

    # ------------------------------------------------------------------ scoring
    def _start_scoring(self, pl_module: pl.LightningModule) -> None:
        if self._taylor is not None:
            self._taylor.__exit__()
        self.groups = self._trace(pl_module)
        self._taylor = TaylorScores(pl_module, self.groups)
        if self.score == "taylor":
            self._taylor.__enter__()

    def _trace(self, pl_module: pl.LightningModule) -> list[KernelGroup]:
        assert self._example is not None
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        device = pl_module.device
        inputs = self._example.map(lambda t: t.to(device))
        one = inputs.first_sample()
        try:
            _, groups = build_groups(pl_module, one)
        except StructuredPruningError:
            raise
        except Exception:  # cutting every batch-sized tensor to one example broke the call: keep them whole
            one = inputs
            _, groups = build_groups(pl_module, one)
        self._example = one
        return groups

    def _due(self, trainer: pl.Trainer) -> bool:
        """Whether kernels are still to go in this run (no scoring cost once the last removal is done)."""
        epoch = trainer.current_epoch
        return any(e >= epoch and e not in self.pruned_epochs for e in self.prune_at_epochs)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._due(trainer):
            if self._capture is not None:
                self._capture.remove()
                self._capture = None
        elif self._taylor is None and self._example is not None:
            self._start_scoring(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._due(trainer):
            return
        if self._taylor is not None:
            self._taylor.end_batch()
        elif self._example is None:
            raise StructuredPruningError(
                "StructuredPruningCallback cannot trace the module: `training_step` never called `pl_module(...)` "
                "(it calls a submodule directly?) and the module has no `example_input_array`; pass `example_inputs` "
                "(a tensor, a tuple of positional arguments or a dict of keyword arguments for `pl_module(...)`)"
            )
        else:  # the example was captured during this batch: scores count from the next one
            self._start_scoring(pl_module)
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        if last:  # before the epoch's validation and checkpoint, so that the checkpoint holds the smaller model
            self._maybe_prune(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_prune(trainer, pl_module)  # an epoch cut short (max_steps) ends here

    # ------------------------------------------------------------------ pruning
    def _maybe_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.prune_at_epochs and epoch not in self.pruned_epochs and self._taylor is not None:
            self._prune(trainer, pl_module, epoch)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        scores = self._scores(trainer, pl_module)
        total = sum(g.channels for g in self.groups)
        removals = select_removals(scores, round(self.percentage / 100 * total), per_layer=self.ranking == "per_layer")
        removals = trainer.strategy.broadcast(removals, src=0)  # rank 0 decides: every rank cuts the same kernels
        magnitude = _magnitude_callbacks(trainer)
        for callback in magnitude:
            pruned = [name for name, mask in callback.get_masks().items() if not bool(mask.all())]
            if pruned:
                raise StructuredPruningError(
                    f"StructuredPruningCallback: kernels are due to go at the end of epoch {epoch} (step "
                    f"{trainer.global_step}), but PruningCallback `{callback.hparams.name}` already prunes "
                    f"{pruned}; removing kernels reshapes those weights and would drop their masks. Order the "
                    "schedules: let magnitude pruning begin (`begin_pruning_step`) after the last epoch in "
                    f"`prune_at_epochs` ({self.prune_at_epochs[-1]})"
                )
        example = self._example
        assert example is not None
        macs_before, params_before = count_macs_and_params(pl_module, example)
        prune_groups(pl_module, example, removals)
        macs, params = count_macs_and_params(pl_module, example)
        self.history.append(removals)
        self.pruned_epochs.append(epoch)
        for callback in magnitude:  # its masks keep everything: bind it to the new weights
            callback.rebind(pl_module)
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            # DDP's wrapper registered the replaced parameters: wrap the smaller module anew (its
            # construction also broadcasts rank 0's weights, so the ranks stay identical).
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)  # the parameters were replaced: new optimizer state
        removed = sum(len(v) for v in removals.values())
        rank_zero_info(
            f"StructuredPruningCallback: epoch {epoch}: removed {removed} of {total} kernels; "
            f"parameters {params_before} -> {params}, MACs {macs_before} -> {macs}"
        )
        self._log(trainer, scores, removals, params, macs)
        if self._due(trainer):
            self._start_scoring(pl_module)
        elif self._taylor is not None:  # the last removal: fine-tuning goes on without the scoring hooks
            self._taylor.__exit__()
            self._taylor = None

    def _scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        if self.score == "l1":
            return l1_scores(pl_module, self.groups)
        if self.score == "random":
            return random_scores(self.groups, seed=len(self.history))
        assert self._taylor is not None
        totals = {g.name: self._taylor.totals.get(g.name, torch.zeros(g.channels)) for g in self.groups}
        # The choice sees every rank's batches: sum the totals over ranks.
        flat = torch.cat([totals[g.name] for g in self.groups]).to(pl_module.device)
        flat = trainer.strategy.reduce(flat, reduce_op="sum").cpu()
        scores, offset = {}, 0
        for g in self.groups:
            scores[g.name] = flat[offset : offset + g.channels]
            offset += g.channels
        return l2_normalize_per_group(scores) if self.ranking == "global" else scores

    def _log(
        self, trainer: pl.Trainer, scores: dict[str, Tensor], removals: dict[str, list[int]], params: int, macs: int
    ) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        step = trainer.global_step
        kept = {g.name: g.channels - len(removals[g.name]) for g in self.groups}
        metrics = {f"structured_pruning/{name}/kernels": float(k) for name, k in kept.items()}
        metrics.update({"structured_pruning/params": float(params), "structured_pruning/macs": float(macs)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.log_histograms and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("structured_pruning/scores", torch.cat(list(scores.values())), step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "pruned_epochs": self.pruned_epochs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "history" not in state_dict:
            raise ValueError("checkpoint state holds no structured-pruning history")
        self.history = [dict(step) for step in state_dict["history"]]
        # Checkpoints of lit_prune <= 0.1 did not say when: the first listed epochs, in order.
        default = self.prune_at_epochs[: len(self.history)]
        self.pruned_epochs = [int(e) for e in state_dict.get("pruned_epochs", default)]


def _magnitude_callbacks(trainer: pl.Trainer) -> list[PruningCallback]:
    return [c for c in trainer.callbacks if isinstance(c, PruningCallback) and c.pruning is not None]  # type: ignore[attr-defined]
