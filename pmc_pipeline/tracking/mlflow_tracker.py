"""MLflow: one run in experiment `tracking.project`; tracking URI from tracking.mlflow_tracking_uri,
else MLFLOW_TRACKING_URI, else the local store file:<tracking.dir>/mlruns."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pmc_pipeline.tracking.config import TrackingConfig

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value


class MLflowTracker:
    def __init__(self, cfg: TrackingConfig, run_name: str, config: dict[str, Any]):
        self.uri = (cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                    or f"file:{Path(cfg.dir).resolve() / 'mlruns'}")
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; a local folder
            # needs no server (use sqlite:/// or http:// URIs for a database or a tracking server)
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.client = MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name(cfg.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.step = 0

    def log(self, values: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        metrics = [Metric(k, v, timestamp, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        self.step = max(self.step, step)

    def summary(self, values: dict[str, Any]) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log({f"summary.{k}": float(v) for k, v in numbers.items()}, self.step)
        for key, value in values.items():
            if key not in numbers:
                self.client.set_tag(self.run_id, f"summary.{key}", str(value))

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
