"""``PruningCallback``: TF's gradual magnitude pruning inside ``Trainer.fit``.

The callback owns a :class:`~lit_prune.Pruning` engine bound to the ``LightningModule`` in
``setup``.  Once per optimizer step (``trainer.global_step``, so gradient accumulation and
several optimizers behave) it zeroes the pruned weights after the step and updates the masks by
TF's rule, from ``on_train_batch_end``.  Gradients are not masked: pruned weights are re-zeroed
after every step and rank last at the next update, so whatever the optimizer state does to them
never reaches the kept weights, and masking them would cost a second pass per step.  Masks,
thresholds and the last update step travel in the Lightning checkpoint; summaries go to
``trainer.loggers`` under TF's tags, on rank zero, only at update steps.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lit_prune.backends.cpu import kernels as cpu_kernels
from lit_prune.config.hparams import PruningHParams
from lit_prune.config.keywords import hparams_keywords, merge_keywords
from lit_prune.engine.pruning import Pruning, SparsityFn
from lit_prune.engine.sharding import is_sharded, local
from lit_prune.engine.strip import masked_layer_buffers, strip_pruning_vars
from lit_prune.lightning.sharded_checkpoint import (
    PREFIX,
    dcp_key,
    load_sharded,
    put_back,
    read_distributed_checkpoint,
    take_sharded,
)

__all__ = ["PruningCallback", "strip_checkpoint"]

_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")
#: Strategies that shard the weights in ``configure_model``, after ``setup``: the engine binds at fit start.
_SHARDING_STRATEGIES = ("ModelParallelStrategy",)


def shards_parameters(strategy: object) -> bool:
    """Whether a Lightning strategy splits parameters over processes (FSDP2/TP, FSDP1, DeepSpeed), unlike DDP."""
    return type(strategy).__name__ in _SHARDING_STRATEGIES + _UNSUPPORTED_STRATEGIES


@hparams_keywords("overrides")
class PruningCallback(Callback):
    """Gradual magnitude pruning with TF ``model_pruning``'s semantics, as a Lightning callback.

    Every hyperparameter is also a typed keyword (the fields of :class:`~lit_prune.PruningHParams`,
    listed below from it), so LightningCLI lists, type-checks and configures them:
    ``--trainer.callbacks+=lit_prune.PruningCallback --trainer.callbacks.target_sparsity=0.9``, or
    ``class_path: lit_prune.PruningCallback`` with ``init_args``; a regex map is a mapping
    (``{"fc.*": 0.95}``) or TF's list (``["fc.*:0.95"]``).

    Args:
        hparams: A :class:`~lit_prune.PruningHParams`, a plain mapping or ``DictConfig`` of its
            fields, a TF-style ``"name=value,..."`` string, or ``None`` for TF's defaults.  The
            keywords apply over it, except one left at its default (LightningCLI passes them all).
        sparsity: Overrides the schedule (a number or a callable of the step), as TF's
            ``Pruning(spec, sparsity=...)``.
        export_path: If set, ``on_train_end`` writes the stripped model's ``state_dict``
            (masks folded in, loadable into the unpruned architecture) to this file; sharded
            weights are gathered to rank zero's CPU first.
        log_histograms: At each mask update, also write per-layer histograms of the kept weights
            and a per-layer sparsity histogram to a ``TensorBoardLogger``.
        **overrides: Hyperparameters given by keyword, applied over ``hparams`` (replaced at import
            by one entry per field).

    Raises:
        HParamsError: a malformed spec (at construction) or, in ``setup``, a map entry that
            matches no weight of the module, listing the candidates.
        MisconfigurationException: an FSDP/DeepSpeed/model-parallel strategy (masks need whole
            weights; use DDP).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lit_prune import PruningCallback
        >>> pruning = PruningCallback(target_sparsity=0.9, sparsity_function_end_step=1000)
        >>> pruning.hparams.target_sparsity
        0.9
        >>> trainer = Trainer(callbacks=[pruning], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        hparams: PruningHParams | Mapping[str, Any] | str | None = None,
        *,
        sparsity: float | SparsityFn | None = None,
        export_path: str | Path | None = None,
        log_histograms: bool = True,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.hparams = merge_keywords(hparams, overrides)
        cpu_kernels.native_enabled()  # a misspelt LIT_PRUNE_NATIVE fails at construction
        self.sparsity = sparsity
        self.export_path = Path(export_path) if export_path is not None else None
        self.log_histograms = log_histograms
        self.pruning: Pruning | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_seen_step = -1
        self._model_sparsity = 0.0
        self._checkpoint_path: str | None = None

    @classmethod
    def from_string(cls, values: str, **kwargs: Any) -> PruningCallback:
        """Build from a TF ``--pruning_hparams`` string.

        Example::

            >>> cb = PruningCallback.from_string("target_sparsity=0.9,weight_sparsity_map=[fc.*:0.95]")
            >>> cb.hparams.target_sparsity, cb.hparams.weight_sparsity_map
            (0.9, ['fc.*:0.95'])
        """
        return cls(PruningHParams().parse(values), **kwargs)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.hparams.name)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def check_strategy(strategy: object) -> None:
        """Raise ``MisconfigurationException`` for a strategy whose parameters hide their shapes (run at ``setup``)."""
        name = type(strategy).__name__
        if name in _UNSUPPORTED_STRATEGIES:
            raise MisconfigurationException(
                f"`PruningCallback` does not support `{name}` (its flat or partitioned parameters hide each "
                "weight's shape): shard with FSDP2 under `ModelParallelStrategy` instead, or use `strategy='ddp'` "
                "(or a single device):\n"
                "    trainer = Trainer(strategy=ModelParallelStrategy(), callbacks=[PruningCallback(...)])\n"
                "    def configure_model(self):  # in the LightningModule; fully_shard from torch.distributed.fsdp\n"
                "        for layer in self.layers: fully_shard(layer)\n"
                "        fully_shard(self)"
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_strategy(trainer.strategy)
        if type(trainer.strategy).__name__ in _SHARDING_STRATEGIES:
            return  # the weights are sharded in configure_model, after this hook: bound at the first hook after it
        self._bind(pl_module)

    def _bind(self, pl_module: pl.LightningModule) -> None:
        """Bind the engine to ``pl_module`` (once), then restore a checkpoint's state waiting for it."""
        if self.pruning is None or self.pruning.model is not pl_module:
            self.pruning = Pruning(pl_module, self.hparams, sparsity=self.sparsity)
            rank_zero_info(f"PruningCallback `{self.hparams.name}`: pruning {len(self.pruning.weight_names)} weights")
        self._restore_pending()

    # --- rebinding after structured pruning (lit_prune.StructuredPruningCallback calls this) ---
    def rebind(self, pl_module: nn.Module, *, discard_masks: bool = False) -> None:
        """Bind a new engine to ``pl_module`` after structured pruning replaced or reshaped its weights.

        Safe while every mask still keeps all weights (the schedule has not pruned yet): nothing is
        lost.  ``discard_masks=True`` rebinds regardless (a checkpoint's masks are loaded next).

        Raises:
            ValueError: a mask already prunes and ``discard_masks`` is off: the schedules overlap.
        """
        if self.pruning is not None and not discard_masks:
            pruned = [name for name, mask in self.pruning.get_masks().items() if not bool(mask.all())]
            if pruned:
                raise ValueError(
                    f"PruningCallback `{self.hparams.name}`: the model's structure changed while masks of {pruned} "
                    "already prune; order the schedules: structured pruning first, magnitude pruning after it"
                )
        self.pruning = Pruning(pl_module, self.hparams, sparsity=self.sparsity)

    # --- end of rebinding ---

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._masks_applied(pl_module)  # sharding strategies bind here; others restore what came after setup

    # ------------------------------------------------------------------ training
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        pruning = self._engine()
        if step != self._last_seen_step:  # an optimizer step happened (not a mid-accumulation batch)
            self._last_seen_step = step
            # An update applies the current masks itself (see Pruning.mask_update).
            if pruning.conditional_mask_update(step):
                self._log_update(trainer, pl_module, step)
                # The progress bar keeps the value until the next update: no per-step logging cost.
                pl_module.log(
                    "sparsity", self._model_sparsity, prog_bar=True, logger=False, on_step=True, on_epoch=False
                )
            else:
                pruning.apply_mask()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._masks_applied(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._masks_applied(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._masks_applied(pl_module)

    def _masks_applied(self, pl_module: pl.LightningModule) -> None:
        """Bound (sharding strategies bind after setup) and the pruned weights zero, before a loop runs."""
        self._bind(pl_module)
        self._engine().apply_mask()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_path is None:
            return
        sharded = any(is_sharded(p) for p in pl_module.parameters())
        if not (sharded or trainer.is_global_zero):
            return
        state = self.stripped_state_dict(pl_module)  # sharded: every process takes part in the gather
        if trainer.is_global_zero:
            self.export_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.export_path)
            rank_zero_info(f"PruningCallback: stripped model written to {self.export_path}")

    # ------------------------------------------------------------------ summaries
    def _log_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        pruning = self._engine()
        summaries = pruning.summaries(step)
        tensors = {k: v for k, v in summaries.items() if isinstance(v, Tensor)}
        values = torch.stack([v.detach().float() for v in tensors.values()] + [pruning.model_sparsity()]).tolist()
        self._model_sparsity = values[-1]  # one host read per update, none in other steps
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {k: float(v) for k, v in summaries.items() if not isinstance(v, Tensor)}
        metrics.update(zip(tensors, values, strict=False))
        metrics[f"{self.hparams.name}_summaries/model_sparsity"] = self._model_sparsity
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.log_histograms:  # the layers' sparsities from the summaries: no collective on rank zero alone
            layers = [v for k, v in zip(tensors, values, strict=False) if k.endswith("/mask/sparsity")]
            self._log_histograms(trainer, step, torch.tensor(layers))

    def _log_histograms(self, trainer: pl.Trainer, step: int, sparsities: Tensor) -> None:
        pruning = self._engine()
        prefix = f"{self.hparams.name}_summaries"
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            writer.add_histogram(f"{prefix}/layer_sparsity", sparsities, global_step=step)
            masks = pruning.get_masks()
            for name, weight in pruning.get_weights().items():
                # a sharded weight: rank zero's shard, a sample of it (the whole would need a gather)
                tag = f"{prefix}/{name}/kept_weights" + ("_rank0_shard" if is_sharded(weight) else "")
                kept = local(weight).detach()[local(masks[name])]
                if kept.numel():
                    writer.add_histogram(tag, kept.float().cpu(), global_step=step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.pruning is None:
            return dict(self._pending_state or {})
        # Sharded weights' masks are DTensors here: on_save_checkpoint moves them where each process saves its part.
        return {
            "pruning": self.pruning.state_dict(),
            "hparams": self.hparams.to_dict(),
            "last_seen_step": self._last_seen_step,
            "model_sparsity": self._model_sparsity,
        }

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        sharded = take_sharded(state["pruning"]) if state and "pruning" in state else {}
        if not sharded:
            return
        if getattr(trainer.strategy, "_save_distributed_checkpoint", False):  # each process writes its part
            checkpoint["state_dict"].update({dcp_key(self.state_key, path): t for path, t in sharded.items()})
            state["in_model_state"] = sorted(sharded)
        else:  # a single-file checkpoint: gathered, as the weights are
            put_back(state["pruning"], {path: t.full_tensor().cpu() for path, t in sharded.items()})

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A truncated or corrupted checkpoint surfaces from torch/fsspec as "Invalid argument" or a
        # weights-only unpickling hint; say what it really is, on the exception itself.
        path = trainer.ckpt_path
        if path is None or not os.path.isfile(path) or zipfile.is_zipfile(path):
            return
        exception.add_note(
            f"lit_prune: the checkpoint {path} is truncated or corrupted (not a complete PyTorch zip archive); "
            "resume from an earlier checkpoint"
        )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            self._checkpoint_path = trainer.ckpt_path  # sharded masks are read from it when the engine binds
            return
        others = [k for k in states if str(k).startswith("PruningCallback")]
        hint = f" It holds {others}: the spec's `name` must match to resume them." if others else ""
        rank_zero_warn(
            f"PruningCallback `{self.hparams.name}`: the checkpoint holds no pruning state under "
            f"`{self.state_key}`.{hint} Masks start dense (all kept) and are recomputed from the loaded weights "
            f"at the next update the schedule allows after step {checkpoint.get('global_step', 0)}."
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sharded"):
            rank_zero_warn(
                f"PruningCallback `{self.hparams.name}`: the checkpoint holds no masks of its sharded weights (they "
                "are not saved through the distributed checkpoint yet); they start dense and are recomputed from the "
                "loaded weights, whose pruned entries are zero and rank last, at the next update the schedule allows"
            )
            self._last_seen_step = int(state_dict.get("last_seen_step", -1))
            return
        if "pruning" not in state_dict:
            raise ValueError(
                f"checkpoint state for `{self.state_key}` holds no pruning state (keys: {sorted(state_dict)}); "
                "it was not written by lit_prune's PruningCallback"
            )
        self._pending_state = dict(state_dict)
        if self.pruning is not None:
            self._restore_pending()

    def _restore_pending(self) -> None:
        if self._pending_state is None or self.pruning is None:
            return
        state, self._pending_state = self._pending_state, None
        if state.get("in_model_state"):
            templates = self._sharded_templates(state["in_model_state"])
            put_back(state["pruning"], load_sharded(self._checkpoint_path, self.state_key, templates))  # type: ignore[arg-type]
        saved, now = state.get("hparams"), self.hparams.to_dict()
        defaults = PruningHParams().to_dict()  # a field newer than the checkpoint counts as its default there
        changed = sorted(k for k in now if (saved or now).get(k, defaults.get(k)) != now[k])
        if changed:
            rank_zero_warn(f"PruningCallback: resuming with changed hparams {changed}; the saved masks are kept")
        self.pruning.load_state_dict(state["pruning"])
        self._last_seen_step = int(state.get("last_seen_step", -1))
        self._model_sparsity = float(state.get("model_sparsity", 0.0))

    def _sharded_templates(self, paths: list[str]) -> dict[str, Tensor]:
        """``DTensor``s laid out as the sharded masks and saliency tensors ``paths`` name, to read them into."""
        engine, templates = self._engine(), {}
        current = engine.state_dict()  # this process's parts, as DTensors
        for path in paths:
            kind, _, rest = path.partition("/")
            name, _, key = rest.partition("/")
            if name not in engine.weight_names:
                raise ValueError(
                    f"PruningCallback `{self.hparams.name}`: the checkpoint holds a sharded mask of {name!r}, which "
                    f"is not pruned here (pruned: {engine.weight_names})"
                )
            tensor = current["masks"][name] if kind == "masks" else current["saliency"][name][key]
            templates[path] = torch.empty_like(tensor)
        return templates

    # ------------------------------------------------------------------ API
    def _engine(self) -> Pruning:
        if self.pruning is None:
            raise RuntimeError(
                "PruningCallback is not bound to a model yet: it binds in `setup` (Trainer.fit/validate/...)"
            )
        return self.pruning

    def get_masks(self) -> dict[str, Tensor]:
        """``{parameter name: bool mask}`` of the pruned weights."""
        return self._engine().get_masks()

    def get_thresholds(self) -> dict[str, Tensor]:
        """``{parameter name: float32 threshold}`` of the pruned weights."""
        return self._engine().get_thresholds()

    def get_weight_sparsity(self) -> dict[str, Tensor]:
        """``{parameter name: fraction masked}`` of the pruned weights."""
        return self._engine().get_weight_sparsity()

    def stripped_state_dict(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """The module's ``state_dict`` with masks folded in and masked-layer buffers dropped (whole tensors).

        With sharded weights (``ModelParallelStrategy``) every process must call it: the masks are
        folded into the shards, which are gathered to rank zero's CPU (the other processes get
        ``{}``); no process holds a whole weight on its accelerator.
        """
        if not any(is_sharded(p) for p in pl_module.parameters()):
            return strip_pruning_vars(pl_module, self._engine()).state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._engine().apply_mask()  # local: the pruned weights of every shard are zero
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(pl_module, options=options)
        dropped = masked_layer_buffers(pl_module)
        return {k: v for k, v in state.items() if k not in dropped}


def strip_checkpoint(checkpoint_path: str | Path, output_path: str | Path | None = None) -> dict[str, Tensor]:
    """Fold the masks of a Lightning checkpoint into its weights: a plain ``state_dict`` for export.

    ``checkpoint_path`` is a checkpoint file, or the directory of a distributed checkpoint
    (``ModelParallelStrategy``: FSDP2, tensor parallelism), whose shards are put together in this
    one process (no process group needed): the result loads into the unsharded model.

    Reads the checkpoint with ``weights_only=True``, multiplies each pruned weight by the mask
    saved by every ``PruningCallback`` in it, drops the masked layers' ``mask``/``threshold``
    buffers, and writes the result to ``output_path`` if given.

    Raises:
        ValueError: the file is not a readable checkpoint (truncated, corrupted), or holds no
            ``PruningCallback`` state.

    Example::

        >>> strip_checkpoint("last.ckpt", "model_stripped.pt")  # doctest: +SKIP
        >>> strip_checkpoint("checkpoints/epoch=0-step=100.ckpt/", "model_stripped.pt")  # a directory  # doctest: +SKIP
    """
    if os.path.isdir(checkpoint_path):  # a distributed checkpoint (ModelParallelStrategy): shards put together
        model_state, checkpoint = read_distributed_checkpoint(checkpoint_path)
        checkpoint["state_dict"] = _with_sharded_masks(model_state, checkpoint)
    else:
        checkpoint = _read_checkpoint_file(checkpoint_path)
    states = [v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith("PruningCallback")]
    if not states:
        raise ValueError(f"{checkpoint_path} holds no PruningCallback state; nothing to strip")
    model_state = dict(checkpoint["state_dict"])
    for state in states:
        for name, mask in state["pruning"]["masks"].items():
            if name not in model_state:
                raise ValueError(f"{checkpoint_path}: pruned weight {name!r} is not in the model's state_dict")
            model_state[name] = model_state[name] * mask.to(model_state[name].dtype)
            module, _, param = name.rpartition(".")
            prefix = f"{module}." if module else ""
            mask_key, threshold_key = (
                (f"{prefix}mask", f"{prefix}threshold")
                if param == "weight"
                else (f"{prefix}{param}_mask", f"{prefix}{param}_threshold")
            )
            if mask_key in model_state and model_state[mask_key].shape == mask.shape:  # a masked layer's buffers
                del model_state[mask_key]
                model_state.pop(threshold_key, None)
    if output_path is not None:
        torch.save(model_state, output_path)
    return model_state


def _read_checkpoint_file(checkpoint_path: str | Path) -> dict[str, Any]:
    """A checkpoint file's contents (``weights_only``), or a ``ValueError`` that says it is unreadable."""
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"no checkpoint file or distributed checkpoint directory at {checkpoint_path}")
    try:
        return torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{checkpoint_path} is not a readable checkpoint (truncated or corrupted?): {str(error)[:200]}"
        ) from error


def _with_sharded_masks(model_state: dict[str, Tensor], metadata: dict[str, Any]) -> dict[str, Tensor]:
    """The model's entries of a distributed checkpoint; the callbacks' sharded masks moved back into their state."""
    for key, state in metadata.get("callbacks", {}).items():
        paths = state.get("in_model_state", []) if isinstance(state, dict) else []
        put_back(state.get("pruning", {}), {path: model_state.pop(dcp_key(key, path)) for path in paths})
    return {k: v for k, v in model_state.items() if not k.startswith(f"{PREFIX}/")}
