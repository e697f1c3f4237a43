"""Weights & Biases: one run in project `tracking.project`, files under <tracking.dir>/wandb/.
WANDB_MODE=offline (or disabled) is honoured by wandb itself; online needs a login (WANDB_API_KEY)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb

from pmc_pipeline.tracking.config import TrackingConfig


class WandbTracker:
    def __init__(self, cfg: TrackingConfig, run_name: str, config: dict[str, Any]):
        directory = Path(cfg.dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, name=run_name, dir=str(directory), config=config,
                              reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
