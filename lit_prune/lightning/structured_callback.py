"""``StructuredPruningCallback``: Molchanov et al.'s iterative prune-and-fine-tune loop inside ``Trainer.fit``.

While training, the Taylor criterion of every kernel accumulates from the training batches' own
backward passes (tensor hooks; nothing is stored beyond a batch).  At the end of each epoch listed in
``prune_at_epochs`` the lowest-scored ``percentage`` of the prunable kernels are removed from the
``LightningModule`` in place (Torch-Pruning surgery: BatchNorm channels, next layers' inputs,
residual and depthwise partners), the optimizers and schedulers are rebuilt through Lightning
(``configure_optimizers`` runs again, so its state restarts), scores restart, and fine-tuning goes
on.  Under DDP the scores are summed over ranks before the choice, so every rank cuts the same
kernels.  The removal history is saved in the checkpoint and replayed in ``setup`` before
Lightning loads the weights, so ``fit(ckpt_path=...)``/``validate(ckpt_path=...)`` work on the
smaller model (the callback wraps the module's ``on_load_checkpoint``, the one hook Lightning
runs before it loads weights, to rebuild the pruned layers first).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lit_prune.oracle.handle import RANKINGS
from lit_prune.oracle.scores import TaylorScores, l1_scores, l2_normalize_per_group, random_scores, select_removals
from lit_prune.oracle.surgery import (
    KernelGroup,
    StructuredPruningError,
    build_groups,
    count_macs_and_params,
    prune_groups,
)

__all__ = ["StructuredPruningCallback"]

_SCORES = ("taylor", "l1", "random")


class StructuredPruningCallback(Callback):
    """Iterative structured (kernel) pruning with the Taylor criterion, as a Lightning callback.

    Args:
        percentage: Share of the currently prunable kernels removed at each pruning epoch, in (0, 100).
        prune_at_epochs: Epochs at whose end kernels are removed (0-based).
        score: ``'taylor'`` (accumulated from the training batches), ``'l1'`` or ``'random'``.
        ranking: ``'per_layer'`` (the same share from every layer) or ``'global'``.
        log_histograms: Write a histogram of the scores to a TensorBoard logger at each removal.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> cb = StructuredPruningCallback(percentage=30, prune_at_epochs=[4, 8])
        >>> trainer = Trainer(callbacks=[cb], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        percentage: float = 25.0,
        prune_at_epochs: list[int] | tuple[int, ...] = (5,),
        score: str = "taylor",
        ranking: str = "per_layer",
        log_histograms: bool = True,
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
        self.history: list[dict[str, list[int]]] = []
        self.groups: list[KernelGroup] = []
        self._example: Tensor | None = None
        self._taylor: TaylorScores | None = None
        self._example_shape: list[int] | None = None

    # ------------------------------------------------------------------ setup and resume
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        launcher = getattr(trainer.strategy, "launcher", None)
        if type(launcher).__name__ == "_MultiProcessingLauncher":
            raise StructuredPruningError(
                "StructuredPruningCallback changes the model's structure, and with a spawning strategy "
                f"(`{type(trainer.strategy).__name__}` with start method "
                f"{getattr(launcher, '_start_method', '?')!r}) Lightning copies the trained weights back into "
                "the unpruned module of the main process, which fails: use `strategy='ddp'`"
            )
        # Lightning loads a checkpoint's weights into the module before callbacks see their state, and
        # the module's own `on_load_checkpoint` is the only hook that runs before: wrap it to rebuild
        # the pruned architecture from this callback's saved history first.
        if getattr(pl_module, "_lit_prune_replay_wrapped", False):
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state and not self.history:
                self.load_state_dict(state)
                self._replay(pl_module)
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        pl_module._lit_prune_replay_wrapped = True

    def _replay(self, pl_module: pl.LightningModule) -> None:
        # Rebuild the pruned architecture so that Lightning can load the checkpoint's weights into it.
        assert self._example_shape is not None
        example = torch.zeros(self._example_shape)
        for removals in self.history:
            prune_groups(pl_module, example, removals)
        rank_zero_info(
            f"StructuredPruningCallback: replayed {len(self.history)} removal step(s) before loading weights"
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._taylor is None:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            self._example = x[:1].detach()
            self._example_shape = list(self._example.shape)
            self._start_scoring(pl_module)

    def _start_scoring(self, pl_module: pl.LightningModule) -> None:
        assert self._example is not None
        if self._taylor is not None:
            self._taylor.__exit__()
        _, self.groups = build_groups(pl_module, self._example)
        self._taylor = TaylorScores(pl_module, self.groups)
        if self.score == "taylor":
            self._taylor.__enter__()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._taylor is not None:
            self._taylor.end_batch()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch not in self.prune_at_epochs or self._taylor is None:
            return
        scores = self._scores(trainer, pl_module)
        total = sum(g.channels for g in self.groups)
        removals = select_removals(scores, round(self.percentage / 100 * total), per_layer=self.ranking == "per_layer")
        assert self._example is not None
        macs_before, params_before = count_macs_and_params(pl_module, self._example)
        prune_groups(pl_module, self._example, removals)
        macs, params = count_macs_and_params(pl_module, self._example)
        self.history.append(removals)
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            # DDP's wrapper registered the replaced parameters: wrap the smaller module anew (its
            # construction also broadcasts rank 0's weights, so the ranks stay identical).
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)  # the parameters were replaced: new optimizer state
        removed = sum(len(v) for v in removals.values())
        rank_zero_info(
            f"StructuredPruningCallback: epoch {trainer.current_epoch}: removed {removed} of {total} kernels; "
            f"parameters {params_before} -> {params}, MACs {macs_before} -> {macs}"
        )
        self._log(trainer, scores, removals, params, macs)
        self._start_scoring(pl_module)

    def _scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        if self.score == "l1":
            return l1_scores(pl_module, self.groups)
        if self.score == "random":
            return random_scores(self.groups, seed=len(self.history))
        assert self._taylor is not None
        totals = {g.name: self._taylor.totals.get(g.name, torch.zeros(g.channels)) for g in self.groups}
        # Every rank must cut the same kernels: sum the totals over ranks.
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

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._taylor is not None:
            self._taylor.__exit__()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "example_shape": self._example_shape}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "history" not in state_dict:
            raise ValueError("checkpoint state holds no structured-pruning history")
        self.history = [dict(step) for step in state_dict["history"]]
        self._example_shape = state_dict.get("example_shape")
