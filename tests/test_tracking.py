"""Experiment trackers (no engine): what `open_trackers` sends to TensorBoard, MLflow (a local file
store) and W&B (offline) is read back from each tracker's own files and compared with what was logged;
unknown, missing or failing trackers are one-line errors before a run starts.
tests/test_variants_engines.py compares a real `pmc unlearn` run's trackers with its metrics.jsonl."""

from __future__ import annotations

import sys

import pytest

from pmc_pipeline.config import from_mapping
from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.schema import TrackingConfig
from pmc_pipeline.tracking import open_trackers
from tracked_values import mlflow_values, tensorboard_values, wandb_values

LINES = [  # what metrics.jsonl lines hold: numbers, and lists and strings that stay out of trackers
    {"epoch": 1, "reward_mean": 0.25, "loss": 3.5, "seconds_epoch": 1.5, "overlap": True,
     "degenerate_questions": [3], "reward": "rouge_l", "loss_align": None},
    {"epoch": 2, "reward_mean": 0.75, "loss": 2.0, "seconds_epoch": 1.25, "overlap": True,
     "degenerate_questions": [], "reward": "rouge_l", "loss_align": None},
]
NUMBERS = {"reward_mean", "loss", "seconds_epoch", "overlap", "epoch"}


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_every_tracker_gets_every_number_of_every_line_and_the_config(tmp_path, offline_wandb):
    cfg = TrackingConfig(dir=str(tmp_path / "tracking"), project="pmc-test")
    config = {"trainer": {"learning_rate": 0.001, "batch_size": 4}, "report_to": ["tensorboard"]}
    with open_trackers(["tensorboard", "mlflow", "wandb"], cfg, "unlearn-run", config) as trackers:
        for line in LINES:
            trackers.log(line, line["epoch"])
        trackers.summary({"checkpoint": "/somewhere/checkpoint-final", "epochs": 2})
    expected = {key: {line["epoch"]: float(line[key]) for line in LINES} for key in NUMBERS}

    scalars, config_text = tensorboard_values(tmp_path / "tracking" / "tensorboard" / "unlearn-run")
    assert {k: v for k, v in scalars.items() if not k.startswith("summary/")} == expected
    assert scalars["summary/epochs"] == {2: 2.0}
    assert "trainer.learning_rate: 0.001" in config_text

    metrics, params, tags = mlflow_values(f"file:{tmp_path / 'tracking' / 'mlruns'}", "pmc-test")
    assert {k: v for k, v in metrics.items() if not k.startswith("summary.")} == expected
    assert params["trainer.learning_rate"] == "0.001" and params["trainer.batch_size"] == "4"
    assert tags["summary.checkpoint"] == "/somewhere/checkpoint-final" and tags["mlflow.runName"] == "unlearn-run"

    history, wandb_config, summary = wandb_values(tmp_path / "tracking" / "wandb")
    assert history == expected
    assert summary["checkpoint"] == "/somewhere/checkpoint-final" and summary["epochs"] == 2
    assert "trainer.learning_rate" in wandb_config


def test_a_failed_run_is_marked_failed(tmp_path, offline_wandb):
    cfg = TrackingConfig(dir=str(tmp_path), project="failing")
    with pytest.raises(RuntimeError, match="engine died"):
        with open_trackers(["mlflow"], cfg, "r", {}) as trackers:
            trackers.log(LINES[0], 1)
            raise RuntimeError("engine died")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED"


def test_unknown_tracker_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"report_to=\['tensorbored'\]: 'tensorbored' is not a tracker; "
                                          r"choose any of: tensorboard, mlflow, wandb"):
        from_mapping("unlearn", {"model": {"path": "m"}, "run_dir": "r", "report_to": ["tensorbored"]})


def test_a_tracker_that_is_not_installed_names_its_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    monkeypatch.delitem(sys.modules, "pmc_pipeline.tracking.wandb_tracker", raising=False)
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the package wandb==0.31.0"):
        with open_trackers(["wandb"], TrackingConfig(dir=str(tmp_path)), "r", {}):
            pass


def test_a_tracker_that_cannot_start_is_one_line_and_stops_the_ones_started(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(dir=str(tmp_path), mlflow_tracking_uri="nosuchscheme://host/x")
    with pytest.raises(PMCError) as info:
        with open_trackers(["tensorboard", "mlflow"], cfg, "r", {}):
            pytest.fail("the run must not start")
    message = str(info.value)
    assert message.startswith("report_to: mlflow could not start (") and "\n" not in message
    assert (tmp_path / "tensorboard" / "r").is_dir()  # started first, then closed


def test_an_existing_tensorboard_run_is_not_written_into(tmp_path):
    existing = tmp_path / "tensorboard" / "r"
    existing.mkdir(parents=True)
    (existing / "events.out.tfevents.mine").write_bytes(b"the user's events")
    with pytest.raises(PMCError, match="already holds a run; set tracking.run_name"):
        with open_trackers(["tensorboard"], TrackingConfig(dir=str(tmp_path)), "r", {}):
            pass
    assert [p.name for p in existing.iterdir()] == ["events.out.tfevents.mine"]
