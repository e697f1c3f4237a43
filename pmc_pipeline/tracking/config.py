"""The `tracking:` config section and the `report_to` check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TRACKERS = ("tensorboard", "mlflow", "wandb")


def check_report_to(report_to: list[str]) -> None:
    unknown = [name for name in report_to if name not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to={list(report_to)}: {unknown[0]!r} is not a tracker; choose any of: "
                         f"{', '.join(TRACKERS)}")


@dataclass
class TrackingConfig:
    """Where `report_to`'s trackers write (pmc_pipeline/tracking/). Only numbers and settings go to them."""

    dir: str = "runs/tracking"  # tensorboard/<run name>/, mlruns/ (the default MLflow store), wandb/
    project: str = "pmc"  # MLflow experiment and W&B project
    run_name: Optional[str] = None  # null: <command>-<output folder name>
    mlflow_tracking_uri: Optional[str] = None  # null: MLFLOW_TRACKING_URI, else file:<dir>/mlruns
