"""`pmc sweep`: the grid, trial names and states, the Pareto front, and a real 2-point sweep of the tiny
model through Ray Tune that is stopped by SIGTERM after its first trial and then run again.

The real sweep runs as a separate `pmc sweep` process on the session's Ray cluster (RAY_ADDRESS): each
trial starts its own vLLM engine and ZeRO-3 rank in the placement group Tune reserves for it."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from pmc_pipeline import config as config_module
from pmc_pipeline.config import from_mapping
from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.recipes.sweep import expand_grid, plan_sweep, split_arguments, trial_name
from pmc_pipeline.recipes.sweep_dir import (MARKER, SUMMARY_FILES, pareto_front, read_marker, sweep_identity,
                                            write_summary)
from pmc_pipeline.runtime.placement import PlacementPlan, job_bundles

GRID = ["pmc.lambda_retain=0.5,2.0", "pmc.epochs=2"]


def unlearn_yaml(path: Path, model: Path, data_dir: Path) -> Path:
    cfg = from_mapping("unlearn", {
        "seed": 3, "model": {"path": str(model)}, "run_dir": "set-by-the-sweep",
        "data": {"tofu_dir": str(data_dir), "forget": "forget", "retain": "retain"},
        "trainer": {"world_size": 1, "learning_rate": 3e-4, "batch_size": 4, "max_length": 128, "torch_threads": 1},
        "sampling": {"num_samples": 4, "temperature": 1.0, "top_p": 0.95, "max_tokens": 32},
        "pmc": {"epochs": 2, "min_len": 3, "reference_max_tokens": 32},
        "rollout": {"max_model_len": 512},
        "evaluation": {"max_tokens": 32},  # eval_every 0: the sweep evaluates each trial's last epoch
    })
    path.write_text(config_module.to_yaml(cfg))
    return path


# -- pure parts ------------------------------------------------------------------------------------

def test_the_grid_follows_hydras_sweep_syntax():
    assert expand_grid(["a.b=1,2", "c=x", "d=choice(p,q)"]) == [
        ["a.b=1", "c=x", "d=p"], ["a.b=1", "c=x", "d=q"], ["a.b=2", "c=x", "d=p"], ["a.b=2", "c=x", "d=q"]]
    assert expand_grid(["k=range(0,3)"]) == [["k=0"], ["k=1"], ["k=2"]]
    assert expand_grid([]) == [[]]
    with pytest.raises(ConfigError, match="sweep override"):
        expand_grid(["k=choice(a,"])


def test_trial_names_are_readable_safe_and_distinct():
    assert trial_name(["pmc.learning_rate=0.0001", "seed=1"]) == "pmc.learning_rate=0.0001_seed=1"
    assert trial_name(["data.forget=/a/b c"]) == "data.forget=-a-b-c"
    assert trial_name([]) == "base"
    long_a, long_b = trial_name([f"k{i}=v" for i in range(40)]), trial_name([f"k{i}=w" for i in range(40)])
    assert len(long_a) <= 120 and long_a != long_b


def test_pareto_front_marks_the_points_no_other_beats_in_both():
    points = [(90.0, 40.0), (80.0, 50.0), (70.0, 45.0), (90.0, 40.0), (95.0, 30.0), (60.0, 60.0)]
    assert pareto_front(points) == [True, True, False, True, True, True]
    assert pareto_front([(50.0, 50.0), (50.0, 51.0)]) == [False, True]


def test_sweep_options_are_typed_and_split_from_the_grid():
    sweep, grid = split_arguments(["pmc.epochs=1,2", "seeds=3", "max_concurrent=2", "sweep_dir=/tmp/x"])
    assert (sweep.seeds, sweep.max_concurrent, sweep.sweep_dir, grid) == (3, 2, "/tmp/x", ["pmc.epochs=1,2"])
    with pytest.raises(ConfigError, match="seeds"):
        split_arguments(["seeds=0"])


def test_a_trial_reserves_its_driver_engines_and_trainer_ranks_in_one_group():
    separate = PlacementPlan(engines=2, tensor_parallel_size=2, trainer_ranks=3, colocate=False, use_gpus=True)
    assert job_bundles(separate) == ([{"CPU": 1.0}, {"GPU": 2.0}, {"GPU": 2.0}, {"GPU": 1.0}, {"GPU": 1.0},
                                      {"GPU": 1.0}], {"engines": 1, "trainer": 3})
    shared = PlacementPlan(engines=2, tensor_parallel_size=1, trainer_ranks=2, colocate=True, use_gpus=True)
    assert job_bundles(shared) == ([{"CPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}], {"shared": 1})


def test_the_summary_replaces_only_files_the_sweep_wrote(tmp_path):
    sweep_dir = tmp_path / "sweep"
    identity = sweep_identity("unlearn/phi-1.5", split_arguments([])[0], GRID)
    assert read_marker(sweep_dir, identity) is None  # new
    sweep_dir.mkdir()
    assert read_marker(sweep_dir, identity) is None  # empty
    (sweep_dir / MARKER).write_text(json.dumps({**identity, "products": {}}))
    write_summary(sweep_dir, [], identity)
    first = {name: (sweep_dir / name).read_bytes() for name in SUMMARY_FILES}
    write_summary(sweep_dir, [], identity)  # its own files: replaced
    assert read_marker(sweep_dir, identity) is not None
    (sweep_dir / "sweep.md").write_text("my own notes\n")  # a user's file appears while the trials run
    with pytest.raises(PMCError, match="sweep.md was not written by this sweep"):
        write_summary(sweep_dir, [], identity)
    assert (sweep_dir / "sweep.md").read_text() == "my own notes\n"
    assert (sweep_dir / "sweep.json").read_bytes() == first["sweep.json"]
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted([MARKER, *SUMMARY_FILES])  # no staged leftovers
    with pytest.raises(PMCError, match="holds another sweep .grid differ"):
        read_marker(sweep_dir, {**identity, "grid": ["pmc.epochs=3"]})


@pytest.mark.engines
def test_the_plan_names_one_trial_per_point_and_seed_and_checks_them_first(tmp_path, finetuned_demo_model,
                                                                          demo_data_dir):
    config = unlearn_yaml(tmp_path / "unlearn.yaml", finetuned_demo_model, demo_data_dir)
    sweep, grid = split_arguments([*GRID, "seeds=2", f"sweep_dir={tmp_path / 'sweep'}"])
    sweep_dir, trials = plan_sweep(str(config), sweep, grid)
    assert [t.name for t in trials] == ["pmc.lambda_retain=0.5_seed=3", "pmc.lambda_retain=0.5_seed=4",
                                        "pmc.lambda_retain=2.0_seed=3", "pmc.lambda_retain=2.0_seed=4"]
    assert [(t.config["pmc"]["lambda_retain"], t.config["seed"], t.config["evaluation"]["eval_every"])
            for t in trials] == [(0.5, 3, 2), (0.5, 4, 2), (2.0, 3, 2), (2.0, 4, 2)]
    assert all(t.state == "new" and t.run_dir == sweep_dir / t.name for t in trials)
    assert not sweep_dir.exists()  # planning writes nothing

    with pytest.raises(PMCError, match=r"trial pmc.lambda_retain=0.5: data.retain: TOFU split .no_such_split. not found"):
        plan_sweep(str(config), *split_arguments([*GRID, "data.retain=no_such_split"]))
    with pytest.raises(ConfigError, match="seed is both"):
        plan_sweep(str(config), *split_arguments(["seed=1,2", "seeds=2"]))
    with pytest.raises(ConfigError, match="run_dir and resume are set by the sweep"):
        plan_sweep(str(config), *split_arguments(["run_dir=/tmp/x"]))


# -- a real sweep, interrupted and run again ---------------------------------------------------------

def run_sweep_cli(pmc_cli, args: list[str], cwd: Path, stop_when: Path | None = None) -> tuple[int, list[str]]:
    """`pmc sweep ...` in a process of its own (forked by `pmc_cli` after the imports) on the session's Ray
    cluster; SIGTERM once `stop_when` appears. Exit status, and stdout's lines then stderr's."""
    import psutil
    import ray

    pid = pmc_cli.start(["sweep", *args], cwd, env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    deadline = time.monotonic() + 900
    while stop_when is not None and time.monotonic() < deadline and psutil.pid_exists(pid):
        if stop_when.is_file():
            os.kill(pid, signal.SIGTERM)
            stop_when = None
        time.sleep(0.5)
    code, out, err = pmc_cli.finish(timeout_s=max(1.0, deadline - time.monotonic()))
    return code, out.splitlines() + err.splitlines()


@pytest.fixture(scope="module")
def swept(tmp_path_factory, rollout_actor, pmc_cli, finetuned_demo_model, demo_data_dir):
    root = tmp_path_factory.mktemp("sweep")
    config = unlearn_yaml(root / "unlearn.yaml", finetuned_demo_model, demo_data_dir)
    args = [str(config), *GRID, "max_concurrent=1", f"sweep_dir={root / 'sweep'}"]
    first_trial = root / "sweep" / "pmc.lambda_retain=0.5" / "summary.json"
    stopped = run_sweep_cli(pmc_cli, args, root, stop_when=first_trial)
    first_state = {"summary_mtime": first_trial.stat().st_mtime_ns,
                   "metrics": (first_trial.parent / "metrics.jsonl").read_text()}
    again = run_sweep_cli(pmc_cli, args, root)
    return {"root": root, "stopped": stopped, "again": again, "first_state": first_state}


@pytest.mark.engines
def test_a_sigterm_stops_the_sweep_in_one_line_that_says_how_to_continue(swept):
    code, lines = swept["stopped"]
    assert code == 143, "\n".join(lines[-30:])
    assert lines[-1].startswith("pmc sweep: interrupted by SIGTERM; run the same `pmc sweep` again"), lines[-5:]


@pytest.mark.engines
def test_the_sweep_run_again_skips_the_finished_trial_and_completes_the_other(swept):
    code, lines = swept["again"]
    assert code == 0, "\n".join(lines[-40:])
    assert any("2 trial(s), 1 already complete, 1 to run" in line for line in lines), "\n".join(lines[-40:])
    first = swept["root"] / "sweep" / "pmc.lambda_retain=0.5"
    assert (first / "summary.json").stat().st_mtime_ns == swept["first_state"]["summary_mtime"]
    assert (first / "metrics.jsonl").read_text() == swept["first_state"]["metrics"]


@pytest.mark.engines
def test_the_sweep_table_and_pareto_plot_name_both_trials_with_their_scores(swept):
    sweep_dir = swept["root"] / "sweep"
    rows = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(r["trial"], r["settings"], r["status"], r["epochs"]) for r in rows] == [
        ("pmc.lambda_retain=0.5", ["pmc.lambda_retain=0.5"], "complete (earlier run)", 2),
        ("pmc.lambda_retain=2.0", ["pmc.lambda_retain=2.0"], "complete", 2)]
    for row in rows:  # the table's scores are each run's last evaluated epoch, as its metrics.jsonl says
        last = json.loads((Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
        assert (row["unlearn_quality"], row["utility"]) == (last["eval_unlearn_quality"], last["eval_utility"])
        assert row["pareto"] == pareto_front([(r["unlearn_quality"], r["utility"]) for r in rows])[rows.index(row)]
        saved = (Path(row["run_dir"]) / "config.yaml").read_text()
        assert f"lambda_retain: {row['settings'][0].split('=')[1]}" in saved
    table = (sweep_dir / "sweep.md").read_text()
    assert all(r["trial"] in table and r["run_dir"] in table for r in rows)
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("| pmc.lambda_retain=2.0 |") for line in swept["again"][1])  # printed too
