"""Learning-rate rewinding at each mask update, and GMP*'s sawtooth (Kurtic & Alistarh 2022).

A mask update removes weights the network relied on; a high learning rate right after it lets
the rest recover, which a decayed rate does not.  :class:`LRRewind` watches the
:class:`~lit_prune.PruningCallback` of the same ``Trainer`` and, at each mask update:

* ``sawtooth="off"`` (rewinding): puts every Lightning LR scheduler (any ``torch.optim``
  scheduler in ``configure_optimizers``) and the optimizers' learning rates back where they
  stood when training began, so the scheduler starts over from the update;
* ``sawtooth="cosine"`` or ``"linear"``: sets the learning rate itself, step by step, from the
  optimizers' initial rate down to ``min_lr_factor`` times it over each interval between two
  updates (``pruning_frequency`` steps).  Before ``begin_pruning_step`` (a dense warm-up) the
  rate is the initial one.  It replaces what a scheduler set; use it without one.

``fine_tune="cosine"`` or ``"linear"`` (with or without a sawtooth) decays the rate from the
initial one to ``min_lr_factor`` times it over the fine-tuning: the steps after
``end_pruning_step`` until the end of training.

Example::

    >>> from lightning.pytorch import Trainer
    >>> from lit_prune import PruningCallback
    >>> trainer = Trainer(callbacks=[PruningCallback("target_sparsity=0.9"), LRRewind(sawtooth="cosine")],
    ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False)
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["LRRewind"]

_SHAPES = ("off", "cosine", "linear")


class LRRewind(Callback):
    """Rewind the learning rate at each mask update (see the module doc).

    Args:
        sawtooth: ``"off"`` rewinds the schedulers; ``"cosine"``/``"linear"`` set a decay from the
            initial rate over each interval between mask updates (GMP*).
        min_lr_factor: The sawtooth's lowest rate, as a fraction of the initial one, in [0, 1].
        fine_tune: ``"off"``, ``"cosine"`` or ``"linear"``: the decay from the initial rate over
            the steps after ``end_pruning_step`` (the fine-tuning).

    Raises:
        ValueError: an unknown ``sawtooth`` or ``fine_tune``, or ``min_lr_factor`` outside [0, 1].
    """

    def __init__(self, sawtooth: str = "off", min_lr_factor: float = 0.0, fine_tune: str = "off") -> None:
        for name, value in (("sawtooth", sawtooth), ("fine_tune", fine_tune)):
            if value not in _SHAPES:
                raise ValueError(f"`{name}` must be one of {list(_SHAPES)}, got {value!r}")
        if not 0.0 <= min_lr_factor <= 1.0:
            raise ValueError(f"`min_lr_factor` must be in [0, 1], got {min_lr_factor!r}")
        self.sawtooth, self.min_lr_factor, self.fine_tune = sawtooth, float(min_lr_factor), fine_tune
        self._initial: list[list[float]] = []
        self._schedulers: list[dict[str, Any]] = []
        self._seen = 0
        self.rewinds = 0

    def _pruning(self, trainer: pl.Trainer) -> Any:
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if type(callback).__name__ == "PruningCallback" and getattr(callback, "pruning", None) is not None:
                return callback.pruning
        return None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        self._initial = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
        self._schedulers = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
        pruning = self._pruning(trainer)
        self._seen = pruning.last_update_step if pruning is not None else 0

    def _set(self, trainer: pl.Trainer, factor: float) -> None:
        for opt, lrs in zip(trainer.optimizers, self._initial, strict=True):
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr * factor

    def _factor(self, shape: str, progress: float) -> float:
        progress = min(1.0, max(0.0, progress))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress
        return self.min_lr_factor + (1.0 - self.min_lr_factor) * decay

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:  # noqa: D102
        pruning = self._pruning(trainer)
        if pruning is None or not self._initial:
            return
        step, hp = trainer.global_step, pruning.hparams
        if pruning.last_update_step != self._seen:  # a mask update ran since the last batch
            self._seen = pruning.last_update_step
            self.rewinds += 1
            if self.sawtooth == "off":
                for config, state in zip(trainer.lr_scheduler_configs, self._schedulers, strict=True):
                    config.scheduler.load_state_dict(state)
                self._set(trainer, 1.0)
        end, total = hp.end_pruning_step, trainer.estimated_stepping_batches
        if 0 <= end < step:  # fine-tuning
            if self.fine_tune != "off" and math.isfinite(total):
                self._set(trainer, self._factor(self.fine_tune, (step - end) / max(1, total - end)))
            elif self.sawtooth != "off":
                self._set(trainer, 1.0)
        elif self.sawtooth != "off" and step >= hp.begin_pruning_step:
            last = max(pruning.last_update_step, hp.begin_pruning_step)
            self._set(trainer, self._factor(self.sawtooth, (step - last) / hp.pruning_frequency))
