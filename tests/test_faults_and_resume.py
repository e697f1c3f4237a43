"""Faults and resume: every way a run can stop leaves only complete checkpoints, says where it stopped
in one line, and `resume=` then ends with the same weights as an uninterrupted run.

The faults, each on real actors (Ray, vLLM, DeepSpeed ZeRO-3 world size 2):
- a trainer rank killed while the group saves the epoch's checkpoint (the other rank is writing);
- the rollout engine killed during sampling, and during a weight push (the run starts its own engine
  for this, as `pmc unlearn` does, since a killed engine cannot be shared);
- `pmc unlearn` (a process of its own: tests/cli_fork_server.py) sent SIGTERM mid-epoch, its resumed run
  sent SIGINT mid-epoch.
Every resumed run continues on the session's shared engine. Each fault must end the run within
BOUND_S: a hang check, not a speed figure; the measured times are printed (`pytest -s`) and quoted in
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from pmc_pipeline import config as config_module
from pmc_pipeline.config import from_mapping
from pmc_pipeline.errors import PMCError
from pmc_pipeline.recipes.unlearn import check_unlearn, run_unlearning
from pmc_pipeline.runtime.checkpoints import complete_checkpoints
from pmc_pipeline.runtime.session import PipelineSession

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(2, 2)]

EPOCHS = 4
BOUND_S = 120


def unlearn_cfg(run_dir, model, data_dir, **extra):
    values = {
        "seed": 7, "model": {"path": str(model)}, "run_dir": str(run_dir),
        "data": {"tofu_dir": str(data_dir), "forget": "forget", "retain": "retain"},
        "trainer": {"world_size": 2, "learning_rate": 3e-4, "batch_size": 4, "max_length": 128, "torch_threads": 1},
        "sampling": {"num_samples": 4, "temperature": 1.0, "top_p": 0.95, "max_tokens": 32},
        "pmc": {"epochs": EPOCHS, "min_len": 3, "reference_max_tokens": 32},
        "rollout": {"max_model_len": 512},
        "evaluation": {"eval_every": 2, "max_tokens": 32},
    }
    values.update(extra)
    return from_mapping("unlearn", values)


def final_weights(run_dir):
    return load_file(str(run_dir / "checkpoint-final" / "model.safetensors"))


def resume_on_shared_engine(run_dir, lent, model, data_dir):
    cfg = unlearn_cfg(run_dir.parent / "unused", model, data_dir, resume=str(run_dir))
    run_unlearning(cfg, PipelineSession(**lent), check_unlearn(cfg))


def assert_same_weights(run_dir, straight_dir):
    straight, resumed = final_weights(straight_dir), final_weights(run_dir)
    assert straight.keys() == resumed.keys() and len(straight) > 0
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[0]}"


def stopped_run_state(run_dir):
    """What a stopped run left behind."""
    return {
        "checkpoints": complete_checkpoints(run_dir),
        "folders": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
        "metric_lines": len((run_dir / "metrics.jsonl").read_text().splitlines()),
        "summary": (run_dir / "summary.json").exists(),
        "final": (run_dir / "checkpoint-final").exists(),
    }


def stopped_after(epoch):
    """The state of a run that stopped during epoch `epoch + 1`: epoch `epoch`'s checkpoint only."""
    return {"checkpoints": [epoch], "folders": [f"epoch-{epoch:04d}"], "summary": False, "final": False}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, lent, finetuned_demo_model, demo_data_dir):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_unlearning(unlearn_cfg(run_dir, finetuned_demo_model, demo_data_dir),
                   PipelineSession(**lent))
    return run_dir


# -- a trainer rank killed while the checkpoint is saved -------------------------------------------

class RankKilledDuringSave(PipelineSession):
    """Rank 1's actor is killed as the group starts saving epoch `epoch`'s checkpoint; rank 0 saves on."""

    def __init__(self, epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.epoch, self.killed_at = epoch, None

    def trainer(self, config, job):
        import ray

        group = super().trainer(config, job)
        original, saves = group.save_state, []

        def save_state(directory):
            saves.append(directory)
            if len(saves) == self.epoch:
                ray.kill(group.actors[1])
                self.killed_at = time.perf_counter()
            return original(directory)

        group.save_state = save_state
        return group


@pytest.fixture(scope="module")
def killed_in_save(tmp_path_factory, lent, finetuned_demo_model, demo_data_dir):
    run_dir = tmp_path_factory.mktemp("killed-in-save") / "run"
    session = RankKilledDuringSave(3, **lent)
    with pytest.raises(PMCError) as failure:
        run_unlearning(unlearn_cfg(run_dir, finetuned_demo_model, demo_data_dir), session)
    seconds = time.perf_counter() - session.killed_at
    print(f"\nrank killed during checkpoint save: the run stopped {seconds:.1f} s later")
    state = stopped_run_state(run_dir)
    resume_on_shared_engine(run_dir, lent, finetuned_demo_model, demo_data_dir)
    after_resume = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return {"run_dir": run_dir, "error": str(failure.value), "seconds": seconds, "state": state,
            "after_resume": after_resume}


def test_a_rank_killed_during_a_save_leaves_only_complete_checkpoints(killed_in_save):
    assert killed_in_save["error"] == (f"epoch 3: trainer rank 1 died in save_state (ActorDiedError: its Ray actor "
                                       f"process is gone); continue from epoch 2's checkpoint with "
                                       f"resume={killed_in_save['run_dir']}")
    assert killed_in_save["seconds"] < BOUND_S
    # epoch 3's metrics line was written before its checkpoint failed; resuming drops it
    state = killed_in_save["state"]
    assert {key: state[key] for key in ("checkpoints", "metric_lines", "summary", "final")} == \
        {"checkpoints": [2], "metric_lines": 3, "summary": False, "final": False}
    # the half-written epoch 3 is never a checkpoint: at most its hidden temp folder is left, unmarked
    assert set(state["folders"]) - {"epoch-0002"} <= {".epoch-0003.tmp"}, state["folders"]
    assert not (killed_in_save["run_dir"] / "checkpoints" / ".epoch-0003.tmp" / "complete.json").exists()
    # the resumed run saves epoch 3 again over whatever was left: only complete checkpoints remain
    assert killed_in_save["after_resume"] == [f"epoch-{EPOCHS:04d}"]


def test_resumed_after_a_failed_save_reproduces_the_uninterrupted_weights(killed_in_save, straight):
    assert_same_weights(killed_in_save["run_dir"], straight)


def test_resumed_run_has_one_metric_line_per_epoch_and_a_summary(killed_in_save, straight):
    run_dir = killed_in_save["run_dir"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, EPOCHS + 1))
    assert [x["reward_mean"] for x in lines] == [x["reward_mean"] for x in uninterrupted]
    elapsed = [x["elapsed_seconds"] for x in lines]
    assert all(later > earlier for earlier, later in zip(elapsed, elapsed[1:]))  # time curves continue
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["resumed_after_epoch"] == 2


def test_resume_refuses_a_changed_config_or_a_finished_run(straight, finetuned_demo_model, demo_data_dir):
    changed = unlearn_cfg(straight.parent / "x", finetuned_demo_model, demo_data_dir, resume=str(straight),
                          sampling={"num_samples": 8, "temperature": 1.0, "top_p": 0.95, "max_tokens": 32})
    with pytest.raises(PMCError, match="differs .* sampling.num_samples"):
        check_unlearn(changed)
    finished = unlearn_cfg(straight.parent / "x", finetuned_demo_model, demo_data_dir, resume=str(straight))
    with pytest.raises(PMCError, match="already reached epoch 4"):
        check_unlearn(finished)


# -- the rollout engine killed during sampling and during a weight push ---------------------------

class EngineKilledDuring(PipelineSession):
    """Starts its own engine (no lent actor) and kills it as the `nth` engine sampling call, or the `nth`
    weight push (which trainer rank 0 drives), goes out."""

    def __init__(self, method: str, nth: int, kept_ranks):
        super().__init__(kept_ranks=kept_ranks)
        self.method, self.nth, self.killed_at, self.client = method, nth, None, None

    def rollout(self, model_source, *engine_args):
        self.client = super().rollout(model_source, *engine_args)
        if self.method == "sample":
            self._kill_on_nth_call(self.client, "sample")
        return self.client

    def trainer(self, config, job):
        group = super().trainer(config, job)
        if self.method == "push_weights":
            self._kill_on_nth_call(group, "push_weights")
        return group

    def _kill_on_nth_call(self, role, method):
        import ray

        original, calls = getattr(role, method), []

        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == self.nth:
                ray.kill(self.client.actors[0])
                self.killed_at = time.perf_counter()
            return original(*args, **kwargs)

        setattr(role, method, call)


@pytest.mark.parametrize("method, nth, epoch, failed", [
    # 12 forget questions in chunks of 8 and 4: the 4th call samples epoch 2's second chunk while the
    # trainer trains its first (the overlapped schedule)
    ("sample", 4, 2, "rollout engine 0 died in sample (ActorDiedError: its Ray actor process is gone)"),
    ("push_weights", 3, 3, "trainer rank 0 failed in send_weights: RolloutEngineError: rollout engine 0 died in "
                           "start_weight_update "
                           "(ActorDiedError: its Ray actor process is gone)"),
], ids=["during-sampling", "during-weight-push"])
def test_a_killed_engine_stops_the_run_in_one_line_and_resume_recovers(
        method, nth, epoch, failed, tmp_path, lent, finetuned_demo_model, demo_data_dir, straight):
    run_dir = tmp_path / "run"
    with EngineKilledDuring(method, nth, lent["kept_ranks"]) as session, pytest.raises(PMCError) as failure:
        run_unlearning(unlearn_cfg(run_dir, finetuned_demo_model, demo_data_dir), session)
    seconds = time.perf_counter() - session.killed_at
    print(f"\nengine killed during {method}: the run stopped {seconds:.1f} s later")
    assert str(failure.value) == (f"epoch {epoch}: {failed}; continue from epoch {epoch - 1}'s checkpoint with "
                                  f"resume={run_dir}")
    assert seconds < BOUND_S
    state = stopped_run_state(run_dir)
    # the push comes after the epoch's training but before its metrics line and checkpoint
    assert state == {**stopped_after(epoch - 1), "metric_lines": epoch - 1}
    resume_on_shared_engine(run_dir, lent, finetuned_demo_model, demo_data_dir)
    assert_same_weights(run_dir, straight)


# -- SIGTERM and SIGINT to `pmc unlearn` ----------------------------------------------------------

def run_cli_until_signal(pmc_cli, args, cwd, signal_number, after_line):
    """Run `pmc unlearn ...` in a process of its own (forked by `pmc_cli` after the imports: the command
    line as the console script runs it), send `signal_number` once its stderr shows `after_line`; exit
    code, stderr lines and the seconds from the signal to the process's end."""
    import psutil
    import ray

    pid = pmc_cli.start(["unlearn", *args], cwd, env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    deadline, signalled_at = time.monotonic() + 600, None
    while signalled_at is None and time.monotonic() < deadline and psutil.pid_exists(pid):
        if pmc_cli.stderr.is_file() and after_line in pmc_cli.stderr.read_text():
            os.kill(pid, signal_number)
            signalled_at = time.perf_counter()
        time.sleep(0.2)
    code, _, stderr = pmc_cli.finish(timeout_s=600)
    lines = stderr.splitlines()
    assert signalled_at is not None, "the run ended before the signal:\n" + "\n".join(lines[-20:])
    return code, lines, time.perf_counter() - signalled_at


@pytest.fixture(scope="module")
def signalled_runs(tmp_path_factory, lent, pmc_cli, finetuned_demo_model, demo_data_dir):
    root = tmp_path_factory.mktemp("signals")
    run_dir = root / "run"
    config_file = root / "unlearn.yaml"
    config_file.write_text(config_module.to_yaml(unlearn_cfg(run_dir, finetuned_demo_model, demo_data_dir)))
    first = run_cli_until_signal(pmc_cli, [str(config_file)], root, signal.SIGTERM, f"epoch 1/{EPOCHS}:")
    after_first = stopped_run_state(run_dir)
    second = run_cli_until_signal(pmc_cli, [str(config_file), f"resume={run_dir}"], root, signal.SIGINT,
                                  f"epoch 2/{EPOCHS}:")
    after_second = stopped_run_state(run_dir)
    resume_on_shared_engine(run_dir, lent, finetuned_demo_model, demo_data_dir)
    for name, (_, _, seconds) in (("SIGTERM", first), ("SIGINT", second)):
        print(f"\n{name} mid-epoch: `pmc unlearn` ended {seconds:.1f} s after the signal")
    return {"run_dir": run_dir, "runs": [(first, after_first, 2, 143, "SIGTERM"),
                                         (second, after_second, 3, 130, "SIGINT")]}


def test_sigterm_and_sigint_stop_the_driver_in_one_line_within_the_bound(signalled_runs):
    run_dir = signalled_runs["run_dir"]
    for (code, lines, seconds), state, epoch, expected_code, name in signalled_runs["runs"]:
        assert code == expected_code, "\n".join(lines[-20:])
        assert lines[-1] == (f"pmc unlearn: interrupted by {name} in epoch {epoch}; continue from epoch "
                             f"{epoch - 1}'s checkpoint with resume={run_dir}"), "\n".join(lines[-20:])
        assert not [line for line in lines if "Traceback" in line]
        assert seconds < BOUND_S
        assert state == {**stopped_after(epoch - 1), "metric_lines": epoch - 1}


def test_resumed_after_two_signals_reproduces_the_uninterrupted_weights(signalled_runs, straight):
    assert_same_weights(signalled_runs["run_dir"], straight)


# -- an engine that cannot start ------------------------------------------------------------------

def test_an_engine_that_fails_to_start_is_one_line_and_leaves_nothing(tmp_path, ray_instance, finetuned_demo_model,
                                                                       demo_data_dir):
    import ray

    run_dir = tmp_path / "run"
    # vLLM itself refuses a context longer than the model's positions: the inputs are checked with a valid
    # context, so pmc's up-front check of the same rule (tests/test_bad_inputs.py) does not stand in its way
    inputs = check_unlearn(unlearn_cfg(run_dir, finetuned_demo_model, demo_data_dir))
    cfg = unlearn_cfg(run_dir, finetuned_demo_model, demo_data_dir, rollout={"max_model_len": 65536})
    before = set(ray.util.placement_group_table())  # the test session's kept trainer ranks hold one
    with PipelineSession() as session, pytest.raises(PMCError) as failure:
        run_unlearning(cfg, session, inputs)
    message = str(failure.value)
    assert message.startswith(f"rollout engine 0 failed to start on {finetuned_demo_model}: "), message
    assert "max_model_len" in message and "\n" not in message
    assert message.endswith("; nothing was kept (no epoch had finished)")
    assert not run_dir.exists()
    leftover = [pg for pg_id, pg in ray.util.placement_group_table().items()
                if pg["state"] == "CREATED" and pg_id not in before]
    assert not leftover, leftover  # the trainer that started beside the engine is gone too
