"""Resume: an interrupted run continued from its last complete checkpoint ends with the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pmc_pipeline.checkpoints import complete_checkpoints
from pmc_pipeline.config import from_mapping
from pmc_pipeline.errors import PMCError
from pmc_pipeline.jobs import check_unlearn, run_unlearning
from pmc_pipeline.session import PipelineSession

pytestmark = pytest.mark.engines

EPOCHS, CRASH_IN_EPOCH = 4, 3


class CrashingSession(PipelineSession):
    """Its trainers fail during the training phase of a given epoch (a stand-in for a lost node)."""

    def __init__(self, crash_in_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.crash_in_epoch = crash_in_epoch

    def trainer(self, settings, world_size):
        group = super().trainer(settings, world_size)
        original, calls = group.train_epoch, []

        def train_epoch(batches, weights):
            calls.append(1)
            if len(calls) == self.crash_in_epoch:
                raise RuntimeError("simulated crash in the middle of an epoch")
            return original(batches, weights)

        group.train_epoch = train_epoch
        return group


def unlearn_cfg(run_dir, model, data_dir, **extra):
    values = {
        "seed": 7, "model": {"path": str(model)}, "run_dir": str(run_dir),
        "data": {"tofu_dir": str(data_dir), "forget": "forget", "retain": "retain"},
        "trainer": {"world_size": 1, "learning_rate": 3e-4, "batch_size": 4, "max_length": 128, "torch_threads": 1},
        "sampling": {"num_samples": 4, "temperature": 1.0, "top_p": 0.95, "max_tokens": 32},
        "pmc": {"epochs": EPOCHS, "min_len": 3, "reference_max_tokens": 32},
        "rollout": {"max_model_len": 512},
        "evaluation": {"eval_every": 2, "max_tokens": 32},
    }
    values.update(extra)
    return from_mapping("unlearn", values)


def final_weights(run_dir):
    return load_file(str(run_dir / "checkpoint-final" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, rollout_actor, finetuned_demo_model, demo_data_dir):
    root = tmp_path_factory.mktemp("resume")
    straight = unlearn_cfg(root / "straight", finetuned_demo_model, demo_data_dir)
    run_unlearning(straight, PipelineSession(rollout_actor=rollout_actor))

    crashed = unlearn_cfg(root / "crashed", finetuned_demo_model, demo_data_dir)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_unlearning(crashed, CrashingSession(CRASH_IN_EPOCH, rollout_actor=rollout_actor))
    after_crash = {
        "checkpoints": complete_checkpoints(root / "crashed"),
        "hidden": sorted(p.name for p in (root / "crashed" / "checkpoints").iterdir()),
        "metric_lines": len((root / "crashed" / "metrics.jsonl").read_text().splitlines()),
        "summary": (root / "crashed" / "summary.json").exists(),
    }
    resumed = unlearn_cfg(root / "elsewhere", finetuned_demo_model, demo_data_dir, resume=str(root / "crashed"))
    run_unlearning(resumed, PipelineSession(rollout_actor=rollout_actor), check_unlearn(resumed))
    return {"root": root, "after_crash": after_crash}


def test_a_crash_leaves_only_complete_checkpoints(runs):
    state = runs["after_crash"]
    assert state["checkpoints"] == [CRASH_IN_EPOCH - 1]  # keep_checkpoints=1: the newest complete one
    assert state["hidden"] == [f"epoch-{CRASH_IN_EPOCH - 1:04d}"]  # no half-written epoch folder left
    assert state["metric_lines"] == CRASH_IN_EPOCH - 1 and not state["summary"]


def test_resumed_run_reproduces_the_uninterrupted_weights(runs):
    root = runs["root"]
    straight, resumed = final_weights(root / "straight"), final_weights(root / "crashed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resumed_run_has_one_metric_line_per_epoch_and_a_summary(runs):
    root = runs["root"]
    lines = [json.loads(x) for x in (root / "crashed" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (root / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, EPOCHS + 1))
    assert [x["reward_mean"] for x in lines] == [x["reward_mean"] for x in straight]
    elapsed = [x["elapsed_seconds"] for x in lines]
    assert all(later > earlier for earlier, later in zip(elapsed, elapsed[1:]))  # time curves continue
    summary = json.loads((root / "crashed" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["resumed_after_epoch"] == CRASH_IN_EPOCH - 1


def test_resume_refuses_a_changed_config_or_a_finished_run(runs, finetuned_demo_model, demo_data_dir):
    root = runs["root"]
    changed = unlearn_cfg(root / "x", finetuned_demo_model, demo_data_dir, resume=str(root / "straight"),
                          sampling={"num_samples": 8, "temperature": 1.0, "top_p": 0.95, "max_tokens": 32})
    with pytest.raises(PMCError, match="differs .* sampling.num_samples"):
        check_unlearn(changed)
    finished = unlearn_cfg(root / "x", finetuned_demo_model, demo_data_dir, resume=str(root / "straight"))
    with pytest.raises(PMCError, match="already reached epoch 4"):
        check_unlearn(finished)
