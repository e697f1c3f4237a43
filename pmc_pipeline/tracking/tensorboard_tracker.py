"""TensorBoard: event files under <tracking.dir>/tensorboard/<run name>/ (torch's SummaryWriter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter  # an ImportError here names the missing tensorboard package

from pmc_pipeline.tracking.config import TrackingConfig


class TensorBoardTracker:
    def __init__(self, cfg: TrackingConfig, run_name: str, config: dict[str, Any]):
        self.log_dir = Path(cfg.dir) / "tensorboard" / run_name
        if self.log_dir.exists() and any(self.log_dir.iterdir()):
            raise FileExistsError(f"{self.log_dir} already holds a run; set tracking.run_name to a new name")
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())), 0)
        self.step = 0

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.step = max(self.step, step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"summary/{key}", value, self.step)
            else:
                self.writer.add_text(f"summary/{key}", str(value), self.step)

    def finish(self, failed: bool) -> None:
        if failed:
            self.writer.add_text("status", "failed", self.step)
        self.writer.close()
