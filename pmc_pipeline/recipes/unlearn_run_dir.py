"""An unlearning run's folder: what running a config into it again means (new, resume, complete), which
settings a resumed run may change, and what a stopped run left to resume from."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pmc_pipeline import config as config_module
from pmc_pipeline.errors import PMCError
from pmc_pipeline.runtime.checkpoints import complete_checkpoints
from pmc_pipeline.schema import UnlearnConfig

log = logging.getLogger(__name__)


# settings a resumed run may change; any other difference from the run's config.yaml is an error
RESUMABLE_CHANGES = ("resume", "run_dir", "pmc.epochs", "baseline.epochs", "resources", "evaluation", "log_samples",
                     "checkpoint_every", "keep_checkpoints", "report_to", "tracking")


def resumable_epoch(cfg: UnlearnConfig) -> int:
    """The last complete checkpoint's epoch of the run `resume=` names (which becomes run_dir)."""
    run_dir = Path(cfg.resume)
    saved_config = run_dir / "config.yaml"
    if not saved_config.is_file():
        raise PMCError(f"resume={run_dir}: not a pmc run directory (no config.yaml)")
    cfg.run_dir = str(run_dir)
    changed = config_changes(run_dir, cfg)
    if changed:
        raise PMCError(f"resume={run_dir}: the config differs from the run's config.yaml in {', '.join(changed)}")
    epochs = complete_checkpoints(run_dir)
    if not epochs:
        raise PMCError(f"resume={run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    if epochs[-1] >= cfg.epochs:
        raise PMCError(f"resume={run_dir}: the run already reached epoch {epochs[-1]} of {cfg.epochs_key}={cfg.epochs}")
    return epochs[-1]


def prepare_run_dir(run_dir: Path, cfg: UnlearnConfig) -> str:
    """What running `cfg` into run_dir again means (a sweep trial, a benchmark stage): "complete" (nothing
    to do), "resume" (from its last checkpoint) or "new"; a run stopped before its first checkpoint is
    moved aside to `<run_dir>.interrupted-<time>`, never deleted."""
    if not (run_dir / "config.yaml").is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise PMCError(f"{run_dir} exists but is not a pmc run dir; move it away")
        return "new"
    changed = config_changes(run_dir, cfg)
    if changed:
        raise PMCError(f"{run_dir} holds a run with other settings ({', '.join(changed)}); use a new folder")
    if run_is_complete(run_dir, cfg):
        return "complete"
    if complete_checkpoints(run_dir):
        return "resume"
    aside = run_dir.with_name(f"{run_dir.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    log.warning("%s had no checkpoint to resume from; moved to %s to start again", run_dir, aside)
    return "new"


def run_is_complete(run_dir: Path, cfg: UnlearnConfig) -> bool:
    """Whether run_dir holds a finished run of cfg's epoch count (its summary is written last)."""
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("epochs") == cfg.epochs


def config_changes(run_dir: Path, cfg: UnlearnConfig) -> list[str]:
    """The keys (other than RESUMABLE_CHANGES) in which cfg differs from the config.yaml of run_dir. A key
    the saved config lacks (a setting added since the run) counts as its default."""
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    current = config_module.to_dict(cfg)
    defaults = OmegaConf.to_container(OmegaConf.structured(UnlearnConfig), resolve=True)
    saved_keys = _flat_keys(saved)

    def before(key: str) -> Any:
        return _lookup(saved, key) if key in saved_keys else _lookup(defaults, key)

    return sorted(key for key in saved_keys | _flat_keys(current)
                  if not key.startswith(RESUMABLE_CHANGES) and before(key) != _lookup(current, key))


def _flat_keys(tree: Any, prefix: str = "") -> set[str]:
    """Dotted names of the leaves ("rollout.model_impl")."""
    if not isinstance(tree, dict) or not tree:
        return {prefix}
    return set().union(*(_flat_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in tree.items()))


def _lookup(tree: Any, dotted: str) -> Any:
    for part in [p for p in dotted.split(".") if p]:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def metric_lines(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def resume_hint(run_dir: Path) -> str:
    """What a stopped run left: a checkpoint to resume from, or nothing."""
    epochs = complete_checkpoints(run_dir)
    if epochs:
        return f"; continue from epoch {epochs[-1]}'s checkpoint with resume={run_dir}"
    if run_dir.is_dir():
        return f"; {run_dir} holds no complete checkpoint to resume from"
    return "; nothing was kept (no epoch had finished)"
