"""Experiment trackers: `report_to: [tensorboard, mlflow, wandb]` on finetune, unlearn and evaluate.

One small file per tracker behind `REGISTRY`; each takes the run's resolved config once, numeric
values per step (an epoch) and a summary at the end. Only numbers and settings are sent: no forget
question, answer or sample text ever goes to a tracker (they stay in the run dir, and only with
log_samples). Every tracker starts before the run does, so one that is not installed or cannot start
is a one-line error before anything else happens.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from typing import Any, Iterator, Mapping, Protocol

from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.tracking.config import TrackingConfig

# tracker -> (its module here, its class, the package it needs as pinned in requirements/common.txt);
# a module is imported only when its tracker is asked for
REGISTRY = {
    "tensorboard": ("tensorboard_tracker", "TensorBoardTracker", "tensorboard==2.21.0"),
    "mlflow": ("mlflow_tracker", "MLflowTracker", "mlflow-skinny==3.17.2"),
    "wandb": ("wandb_tracker", "WandbTracker", "wandb==0.31.0"),
}


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def finish(self, failed: bool) -> None: ...


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"trainer": {"lr": 1}} -> {"trainer.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among `values` (booleans as 0/1); lists, strings and None stay out."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}


class Trackers:
    """All trackers of one run, used as one."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, values: Mapping[str, Any], step: int) -> None:
        numbers = numeric(values)
        for tracker in self.trackers:
            tracker.log(numbers, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.summary(dict(values))

    def finish(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.finish(failed)


def _start(name: str, cfg: TrackingConfig, run_name: str, config: dict[str, Any]) -> Tracker:
    module, class_name, package = REGISTRY[name]
    try:
        cls = getattr(importlib.import_module(f"{__name__}.{module}"), class_name)
    except ImportError as exc:
        raise ConfigError(f"report_to: {name} needs the package {package} ({exc.msg}); `make install` "
                          "installs it") from None
    try:
        return cls(cfg, run_name, config)
    except Exception as exc:  # a tracker's own error (no server, no login, bad URI): name it, one line
        message = " ".join(str(exc).split())[:300]
        raise PMCError(f"report_to: {name} could not start ({type(exc).__name__}: {message})") from None


@contextlib.contextmanager
def open_trackers(report_to: list[str], cfg: TrackingConfig, run_name: str, config: dict[str, Any]) -> Iterator[Trackers]:
    """Start every tracker in `report_to` (in order; a failure stops the ones already started), yield
    them as one, finish them (as failed if the run raised)."""
    started: list[Tracker] = []
    try:
        for name in dict.fromkeys(report_to):
            started.append(_start(name, cfg, cfg.run_name or run_name, flatten(config)))
    except BaseException:
        Trackers(started).finish(failed=True)
        raise
    trackers = Trackers(started)
    try:
        yield trackers
    except BaseException:
        trackers.finish(failed=True)
        raise
    trackers.finish()
