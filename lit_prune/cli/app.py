"""The ``lit-prune`` command: a Hydra app that trains a LightningModule with gradual pruning.

``lit-prune`` with no arguments trains the digits CNN (scikit-learn's digits) with TF's gradual
schedule to 90 % sparsity, after a dense baseline of the same length, and leaves in the run
folder: TensorBoard logs (``tensorboard/``), checkpoints (``checkpoints/last.ckpt``), the stripped
model (``model_stripped.pt``; ``export.compressed=model.safetensors`` also writes it compressed)
and ``summary.json``/``summary.md`` (dense vs pruned accuracy,
per-layer sparsity).  Every field of the configs in ``conf/`` is overridable from the command line
(``lit-prune pruning.target_sparsity=0.95``), ``pruning_hparams="..."`` takes a TF-style string,
and ``--config-dir recipes --config-name NAME`` launches a recipe.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lit_prune.backends.cpu import kernels as cpu_kernels
from lit_prune.config.hparams import PruningHParams
from lit_prune.config.schema import structured_schema

__all__ = ["PruningSchema", "SparsitySweepPlot", "export_compressed", "main", "train"]

log = logging.getLogger("lit_prune")

#: The Hydra schema of a pruning spec, derived from ``PruningHParams`` (names, types, defaults): see
#: :func:`lit_prune.config.schema.structured_schema`.  The regex maps and pattern lists are typed
#: ``Any`` with a ``null`` default, so that a command line may set them in TF's list form or as a
#: ``{regex: value}`` mapping; ``PruningHParams`` validates their entries (and every range) when
#: the run starts, before any training.
PruningSchema = structured_schema()


def register_configs() -> None:
    """Register the pruning schema in Hydra's ``ConfigStore`` (group ``pruning``, name ``schema``)."""
    ConfigStore.instance().store(group="pruning", name="schema", node=PruningSchema)


def resolve_pruning(cfg: DictConfig) -> PruningHParams:
    """Validate ``cfg.pruning``, apply ``cfg.pruning_hparams`` (a TF-style string) and write the result back."""
    spec = PruningHParams.coerce(OmegaConf.to_container(cfg.pruning, resolve=True))  # type: ignore[arg-type]
    if cfg.get("pruning_hparams"):
        spec = spec.parse(str(cfg.pruning_hparams))
    with open_dict(cfg):
        cfg.pruning = OmegaConf.merge(OmegaConf.structured(PruningSchema), spec.to_dict())
    return spec


def _callbacks(cfg: DictConfig, with_pruning: bool) -> list[Any]:
    out = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None or "_target_" not in node:
            continue
        is_pruning = str(node._target_).endswith("PruningCallback")
        if is_pruning and not with_pruning:
            continue
        if not with_pruning and "ModelCheckpoint" in str(node._target_):
            continue
        out.append(instantiate(node, _convert_="all"))
    return out


def _fit_and_test(cfg: DictConfig, with_pruning: bool, version: str) -> tuple[Any, Any, float]:
    from lightning.pytorch import seed_everything

    seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    logger = instantiate(cfg.logger, version=version, _convert_="all") if cfg.get("logger") else False
    callbacks = _callbacks(cfg, with_pruning)
    extra = {} if with_pruning else {"enable_checkpointing": False}  # the dense baseline keeps no checkpoint
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, _convert_="all", **extra)
    for callback in callbacks:  # under ddp_spawn the main process takes the smaller structure this way
        getattr(callback, "attach", lambda module: module)(model)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path") if with_pruning else None)
    results = trainer.test(model, datamodule=datamodule, verbose=False)
    accuracy = float(results[0].get("test_acc", float("nan"))) if results else float("nan")
    return trainer, callbacks, accuracy


def train(cfg: DictConfig) -> float:
    """Run the configured job: optional dense baseline, pruned training, test, summary; returns pruned test accuracy."""
    # Lightning prints through its own handler; Hydra's root handlers would print every line twice.
    logging.getLogger("lightning.pytorch").propagate = False
    spec = resolve_pruning(cfg)
    cpu_kernels.native_enabled()  # a misspelt LIT_PRUNE_NATIVE fails before the dense baseline
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("mode", "train") == "scan":  # a sensitivity scan instead of a pruned run (lit_prune.cli.scan)
        from lit_prune.cli.scan import run_scan

        run_scan(cfg, spec, out_dir)
        return float("nan")
    if cfg.get("mode", "train") != "train":
        raise ValueError(f"`mode` must be 'train' or 'scan', got {cfg.mode!r}")
    _check_binding(cfg, spec)
    _check_strategy(cfg)
    dense_acc = None
    if cfg.get("dense_baseline"):
        _, _, dense_acc = _fit_and_test(cfg, with_pruning=False, version="dense")
    trainer, callbacks, pruned_acc = _fit_and_test(cfg, with_pruning=True, version="pruned")
    summary: dict[str, Any] = {
        "dense_test_acc": dense_acc,
        "pruned_test_acc": pruned_acc,
        "target_sparsity": spec.target_sparsity,
        "global_step": trainer.global_step,
        "hparams": spec.to_dict(),
    }
    model = trainer.lightning_module
    summary["num_params"] = sum(p.numel() for p in model.parameters())
    for callback in callbacks:  # each pruning callback's part of the summary (both, in a combined recipe)
        if type(callback).__name__ == "StructuredPruningCallback":
            summary["kernels_removed"] = [sum(len(v) for v in step.values()) for step in callback.history]
            summary["conv_kernels"] = {
                name: m.out_channels for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
            }
        elif type(callback).__name__ == "PruningCallback" and callback.pruning is not None:
            summary["model_sparsity"] = float(callback.pruning.model_sparsity())
            summary["last_mask_update_step"] = callback.pruning.last_update_step
            summary["weight_sparsity"] = {k: round(float(v), 4) for k, v in callback.get_weight_sparsity().items()}
            summary["weight_targets"] = callback.pruning.weight_targets()
            summary["nm_weights"] = {k: f"{n}:{m}" for k, (n, m) in callback.pruning.nm_weights().items()}
    exported = export_compressed(cfg, out_dir, model, callbacks, write=trainer.is_global_zero)  # sharded: all gather
    if not trainer.is_global_zero:  # each process of a launched strategy runs this far; rank zero reports
        return pruned_acc
    if exported:
        summary["compressed_export"] = exported
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(_summary_markdown(summary))
    log.info("\n%s", _summary_markdown(summary))
    return pruned_acc


def export_compressed(
    cfg: DictConfig, out_dir: Path, model: torch.nn.Module, callbacks: list[Any], write: bool = True
) -> dict | None:
    """Write ``cfg.export.compressed`` if set: the stripped model, compressed (:func:`lit_prune.save_compressed`).

    A relative path lands in the run folder.  The weights are those of the first
    ``PruningCallback`` with its masks folded in (the model's own ``state_dict`` without one).
    Under sharding every process must call it (the weights are gathered to rank zero), with
    ``write`` true on rank zero alone.  Returns the file's path, its size and the dense size of
    its tensors, for the summary (``None`` where nothing was written).
    """
    target = (cfg.get("export") or {}).get("compressed")
    if not target:
        return None
    from lit_prune.export import save_compressed

    path = Path(str(target))
    path = path if path.is_absolute() else out_dir / path
    pruning = [cb for cb in callbacks if type(cb).__name__ == "PruningCallback" and cb.pruning is not None]
    state = pruning[0].stripped_state_dict(model) if pruning else model.state_dict()
    if not write:
        return None
    kinds = save_compressed(state, path)
    dense = sum(t.numel() * t.element_size() for name, t in state.items() if not kinds[name].startswith("alias"))
    log.info("compressed model written to %s: %d bytes (its tensors dense: %d bytes)", path, path.stat().st_size, dense)
    return {"path": str(path), "bytes": path.stat().st_size, "dense_tensor_bytes": dense}


def _check_binding(cfg: DictConfig, spec: PruningHParams) -> None:
    """Bind the spec to the model built on ``meta`` (no memory, no data): a map or allocation error before training.

    Only :class:`HParamsError` is raised; a model that cannot be built on ``meta`` is left to the run itself.
    """
    from lit_prune.config.errors import HParamsError
    from lit_prune.engine.pruning import Pruning

    try:
        with torch.device("meta"):
            model = instantiate(cfg.model, _convert_="all")
        Pruning(model, spec)
    except HParamsError:
        raise
    except Exception:  # noqa: BLE001 - a model that needs real tensors to be built: checked when the run binds
        return


def _check_strategy(cfg: DictConfig) -> None:
    """Refuse before the dense run what the pruned run's callbacks refuse at ``setup``: a strategy they cannot use.

    The trainer is built (no process is launched, nothing trained) only when some callback checks its strategy.
    """
    checks = [cb for cb in _callbacks(cfg, with_pruning=True) if hasattr(cb, "check_strategy")]
    if not checks:
        return
    strategy = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, _convert_="all").strategy
    for callback in checks:
        callback.check_strategy(strategy)


def _summary_markdown(summary: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f} %"

    title = "structured pruning" if "conv_kernels" in summary else f"`{summary['hparams']['name']}`"
    lines = [
        f"# lit_prune run: {title}",
        "",
        "| | test accuracy |",
        "| --- | ---: |",
        f"| dense baseline | {pct(summary['dense_test_acc'])} |",
        f"| pruned | {pct(summary['pruned_test_acc'])} |",
        "",
    ]
    if "conv_kernels" in summary:
        lines += [
            f"Structured pruning: {summary['kernels_removed']} kernels removed per step; "
            f"{summary['num_params']} parameters left.",
            "",
            "| conv | kernels |",
            "| --- | ---: |",
        ]
        lines += [f"| `{name}` | {n} |" for name, n in summary["conv_kernels"].items()]
        if "weight_sparsity" not in summary:  # structured pruning alone
            return "\n".join(lines) + "\n"
        lines.append("")
    lines += [
        f"Model sparsity {pct(summary.get('model_sparsity'))} (target {pct(summary['target_sparsity'])}), "
        f"last mask update at step {summary.get('last_mask_update_step')} of {summary['global_step']}.",
        "",
        "| weight | sparsity | target | N:M |",
        "| --- | ---: | ---: | ---: |",
    ]
    nm, targets = summary.get("nm_weights", {}), summary.get("weight_targets", {})
    for name, value in summary.get("weight_sparsity", {}).items():
        lines.append(f"| `{name}` | {pct(value)} | {pct(targets.get(name))} | {nm.get(name, '-')} |")
    return "\n".join(lines) + "\n"


class SparsitySweepPlot(HydraCallback):
    """Hydra callback: after a multirun, plot test accuracy against sparsity from the jobs' ``summary.json``.

    Writes ``accuracy_vs_sparsity.png`` and ``sweep.md`` into the sweep folder.
    """

    def __init__(self, filename: str = "accuracy_vs_sparsity.png") -> None:
        self.filename = filename

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for path in sorted(sweep_dir.glob("*/summary.json")):
            s = json.loads(path.read_text())
            rows.append((s.get("model_sparsity", s["target_sparsity"]), s["pruned_test_acc"], s.get("dense_test_acc")))
        if not rows:
            log.warning("SparsitySweepPlot: no summary.json under %s", sweep_dir)
            return
        rows.sort()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([100 * r[0] for r in rows], [100 * r[1] for r in rows], "o-", label="pruned (lit_prune)")
        dense = [r[2] for r in rows if r[2] is not None]
        if dense:
            ax.axhline(100 * sum(dense) / len(dense), color="grey", linestyle="--", label="dense baseline")
        ax.set_xlabel("model sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("accuracy vs sparsity")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(sweep_dir / self.filename, dpi=120)
        plt.close(fig)
        table = ["| model sparsity | pruned test acc | dense test acc |", "| ---: | ---: | ---: |"]
        table += [
            f"| {100 * s:.1f} % | {100 * a:.2f} % | {'-' if d is None else f'{100 * d:.2f} %'} |" for s, a, d in rows
        ]
        (sweep_dir / "sweep.md").write_text("\n".join(table) + "\n")
        log.info("SparsitySweepPlot: wrote %s", sweep_dir / self.filename)


register_configs()


@hydra.main(version_base="1.3", config_path="pkg://lit_prune.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Entry point of ``lit-prune`` and ``python -m lit_prune``."""
    return train(cfg)
