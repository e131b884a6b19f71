"""``lit-prune mode=scan``: train the model dense, then scan each weight's sensitivity to pruning.

The scan (:func:`lit_prune.engine.sensitivity.sensitivity`) prunes each weight alone, one-shot, at
``scan.sparsities`` and evaluates the validation metrics (``trainer.validate``); it writes
``scan.json``, ``scan.csv`` and ``scan.png`` into the run folder, with the proposed
``weight_sparsity_map`` for ``pruning.target_sparsity``.  Feed it back with::

    lit-prune pruning.allocation=sensitivity pruning.sensitivity_scan=<run folder>/scan.json

Bad input (no weight to scan, a metric the validation does not log, sparsities outside [0, 1))
fails before the dense training, naming the setting.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from lit_prune.config.hparams import HParamsError, PruningHParams
from lit_prune.engine.selection import select_weights
from lit_prune.engine.sensitivity import SensitivityScan, sensitivity
from lit_prune.lightning.pruning_callback import shards_parameters

__all__ = ["run_scan"]

log = logging.getLogger("lit_prune")


def _scan_settings(cfg: DictConfig) -> tuple[list[float], str, str]:
    scan = cfg.get("scan") or {}
    sparsities = [float(s) for s in (scan.get("sparsities") or [])]
    if not sparsities or any(not 0.0 <= s < 1.0 for s in sparsities):
        raise HParamsError(f"`scan.sparsities` must be a non-empty list of floats in [0, 1), got {sparsities}")
    metric, mode = str(scan.get("metric") or ""), str(scan.get("mode") or "min")
    if not metric:
        raise HParamsError("`scan.metric` is empty: name a validation metric, e.g. val_loss")
    return sparsities, metric, mode


def run_scan(cfg: DictConfig, spec: PruningHParams, out_dir: Path) -> SensitivityScan:
    """Train ``cfg.model`` dense on ``cfg.data``, scan its weights' sensitivity, write the results to ``out_dir``.

    Raises:
        HParamsError: no weight to scan, or a ``scan`` setting that cannot work; before training.
    """
    from lightning.pytorch import seed_everything

    sparsities, metric, mode = _scan_settings(cfg)
    seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    weights = select_weights(model, spec.prune_patterns, spec.exclude_patterns)
    if not weights:
        raise HParamsError("no weight to scan: `pruning.prune_patterns`/`exclude_patterns` leave none")
    quiet: dict[str, Any] = {"logger": False, "callbacks": [], "enable_checkpointing": False}
    evaluator = instantiate(cfg.trainer, enable_progress_bar=False, enable_model_summary=False, **quiet)
    if shards_parameters(evaluator.strategy):
        raise HParamsError(
            f"mode=scan prunes each weight whole, in one process, and does not run under "
            f"{type(evaluator.strategy).__name__} (e.g. trainer=fsdp2_cpu): scan with trainer=cpu or trainer=gpu; "
            "the proposed map then feeds a sharded run as it is"
        )

    def evaluate(module: Any) -> dict[str, float]:
        results = evaluator.validate(module, datamodule=datamodule, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}

    logged = evaluate(model)  # before training: the metric must be one the validation logs
    if metric not in logged:
        raise HParamsError(f"`scan.metric`={metric!r} is not a validation metric of this model: {sorted(logged)}")
    trainer = instantiate(cfg.trainer, **quiet)
    trainer.fit(model, datamodule=datamodule)
    scan = sensitivity(model, evaluate, sparsities, weights, metric=metric, mode=mode)
    paths = scan.save(out_dir, target=spec.target_sparsity)
    proposal = scan.weight_sparsity_map(spec.target_sparsity)
    log.info(
        "sensitivity scan written to %s, %s and %s\nproposed weight_sparsity_map for %s: %s\nfeed it back with: "
        "lit-prune pruning.allocation=sensitivity pruning.sensitivity_scan=%s",
        paths["json"],
        paths["csv"],
        paths["png"],
        spec.target_sparsity,
        proposal,
        paths["json"],
    )
    return scan
