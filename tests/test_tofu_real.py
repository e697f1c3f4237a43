"""`pmc tofu-real`'s whole code path, CI-sized: the tiny model on a few real TOFU rows (one forget01
author, one retain90 author, 3 questions each), the retain model and the fine-tuned model trained
from the base, unlearned by PMC and PMC-fast from that one checkpoint (two methods prove "every method
from the same checkpoint"; PMC-alignment's engine run is tests/test_variants_engines.py's), every
model evaluated, one results table; then run again, which
finds every stage complete and only rewrites the report; and the same command into a second out_dir,
which must give the same numbers and weights bit for bit (docs/reliability.md's guarantee)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmc_pipeline.config import from_mapping
from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.recipes.tofu_real import QUESTIONS_PER_AUTHOR, run_tofu_real
from pmc_pipeline.recipes.tofu_real_seeds import check_seed_names
from pmc_pipeline.recipes.tofu_real_stages import Stages
from pmc_pipeline import config as config_module
from pmc_pipeline.runtime.session import PipelineSession

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(1)]


def tiny_benchmark(out_dir, model, tofu_dir, **changes):
    values = {
        "model": str(model), "tofu_dir": str(tofu_dir), "out_dir": str(out_dir), "questions_per_author": 3,
        "forget_authors": 1, "retain_authors": 1,
        "finetune": {"epochs": 3, "trainer": {"learning_rate": 1e-3, "batch_size": 2, "max_length": 160,
                                              "torch_threads": 1}},
        "unlearn": {"trainer": {"learning_rate": 3e-4, "batch_size": 1, "max_length": 160, "torch_threads": 1},
                    "sampling": {"num_samples": 2, "max_tokens": 16},
                    "pmc": {"epochs": 2, "min_len": 2, "reference_max_tokens": 16},
                    "rollout": {"max_model_len": 512}, "evaluation": {"eval_every": 1, "max_tokens": 16}},
        "methods": {"pmc": {}, "pmc-fast": {"pmc": {"fast": True}}},
        "evaluate": {"evaluation": {"max_tokens": 16}, "attack": {"k": 2, "max_tokens": 16}},
        **changes}
    return from_mapping("tofu_real", values)


NEIGHBOUR_FILES = ("real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed")
NEIGHBOUR_ROWS = 6  # of 100 / 117: each of the benchmark's 22 evaluations answers and scores them


@pytest.fixture(scope="module")
def few_neighbours_tofu(tmp_path_factory, tofu_dir) -> Path:
    """The TOFU folder with the first rows of real_authors and world_facts (and their perturbed rows) only;
    every other split is the real file."""
    out = tmp_path_factory.mktemp("tofu-few-neighbours")
    for path in tofu_dir.iterdir():
        if path.stem in NEIGHBOUR_FILES:
            (out / path.name).write_text("\n".join(path.read_text().splitlines()[:NEIGHBOUR_ROWS]) + "\n")
        else:
            (out / path.name).symlink_to(path)
    return out


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory, lent, tiny_model_dir, few_neighbours_tofu):
    out = tmp_path_factory.mktemp("tofu-real") / "bench"
    cfg = tiny_benchmark(out, tiny_model_dir, few_neighbours_tofu)
    report = run_tofu_real(cfg, PipelineSession(**lent))
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")}
    again = run_tofu_real(cfg, PipelineSession(**lent))
    return {"out": out, "cfg": cfg, "report": report, "again": again, "stamps": stamps}


@pytest.fixture(scope="module")
def repeated(benchmark, lent, tiny_model_dir, few_neighbours_tofu):
    """The same command from scratch into another out_dir (all that differs in its config)."""
    out = benchmark["out"].parent / "bench-again"
    report = run_tofu_real(tiny_benchmark(out, tiny_model_dir, few_neighbours_tofu), PipelineSession(**lent))
    return {"out": out, "report": report}


TIMING = re.compile(r"seconds|timeline|elapsed")  # wall-clock figures: the only numbers allowed to differ


def measured(path: Path, out_dir: Path) -> object:
    """A JSON / JSON-lines file's content without wall-clock figures, its out_dir written as OUT."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not TIMING.search(k)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    text = path.read_text().replace(str(out_dir), "OUT")
    if path.suffix == ".jsonl":
        return [strip(json.loads(line)) for line in text.splitlines()]
    return strip(json.loads(text))


def test_the_same_command_again_gives_the_same_numbers_and_weights_bit_for_bit(benchmark, repeated):
    first, second = benchmark["out"], repeated["out"]
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.suffix in (".json", ".jsonl")
                   and "checkpoints" not in p.parts and p.name != "roles.json")  # roles.json: pids, memory
    # every epoch's samples, winners, losses and rewards (metrics.jsonl), references, evaluations, the table
    assert {"results.json", "runs/pmc/metrics.jsonl", "runs/pmc-fast/summary.json", "eval/pmc/eval.json",
            "eval/finetuned/eval.json"} <= {str(f) for f in files}
    differ = [str(f) for f in files if measured(first / f, first) != measured(second / f, second)]
    assert differ == [], differ
    for model in ("retain-model", "finetuned", "runs/pmc/checkpoint-final", "runs/pmc-fast/checkpoint-final"):
        a, b = (load_file(str(root / model / "model.safetensors")) for root in (first, second))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model


def test_the_chosen_authors_are_written_and_unlearning_never_sees_forget_answers(benchmark, tofu_dir):
    out = benchmark["out"]
    rows = lambda name: [json.loads(line) for line in (out / "data" / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    source = [json.loads(line) for line in (tofu_dir / "forget01.json").read_text().splitlines()]
    retain = [json.loads(line) for line in (tofu_dir / "retain90.json").read_text().splitlines()]
    assert rows("forget") == source[:3] and rows("retain") == retain[:3]
    assert rows("train") == source[:3] + retain[:3]
    assert rows("forget_questions") == [{"question": r["question"]} for r in source[:3]]
    # TOFU's standard metrics: the retain author's perturbed rows, and the next retain90 author as the holdout
    perturbed = [json.loads(line) for line in (tofu_dir / "retain_perturbed.json").read_text().splitlines()]
    assert rows("retain_perturbed") == perturbed[:3]
    assert rows("holdout") == retain[20:23] and not {r["question"] for r in rows("holdout")} & {
        r["question"] for r in rows("train")}
    for method in ("pmc", "pmc-fast"):
        saved = (out / "runs" / method / "config.yaml").read_text()
        assert "forget_questions.jsonl" in saved and "finetuned" in saved  # from the one fine-tuned checkpoint


def test_every_model_is_evaluated_and_the_table_holds_each_split_and_the_neighbour_change(benchmark):
    out, columns = benchmark["out"], benchmark["report"]["columns"]
    assert list(columns) == ["retain-model", "base", "finetuned", "pmc", "pmc-fast"]
    for name, column in columns.items():
        results = json.loads((out / "eval" / name / "eval.json").read_text())
        assert column["real_authors"] == results["real_authors"]["rouge_l_recall"]
        assert column["world_facts"] == results["world_facts"]["rouge_l_recall"]
        assert column["utility"] == results["utility"]["value"]
        assert column["sampling_attack"] == results["sampling_attack"]["mean_worst_case_recall"]
        assert column["mc_most_likely"] == results["mc_leakage"]["true_most_likely_rate"]
        # TOFU's standard metrics: the retain authors' perturbed rows, the next author as the holdout
        tofu = results["tofu"]
        assert tofu["retain"]["n"] == 3 and tofu["forget"]["n"] == 3
        assert column["model_utility"] == tofu["model_utility"] is not None
        assert column["membership_auc"] == tofu["privacy"]["auc"] is not None
        assert column["forget_truth_ratio"] == tofu["forget"]["truth_ratio"]
        if name == "retain-model":  # the reference: against itself
            assert column["forget_quality"] == 1.0 and column["privleak"] == 0.0 and tofu["forget_quality"] is None
        else:  # against the retain model's evaluation, which every later evaluation names
            assert tofu["retain_model_eval"] == str(out / "eval" / "retain-model")
            assert column["forget_quality"] == tofu["forget_quality"] is not None and 0 <= column["forget_quality"] <= 1
        for split in ("real_authors", "world_facts"):  # relative to the fine-tuned model (none when it scored 0)
            base = columns["finetuned"][split]
            assert column[f"{split}_change"] == (pytest.approx((column[split] - base) / base) if base else None)
    assert columns["pmc"]["epochs"] == 2 and columns["finetuned"].get("epochs") is None
    assert columns["pmc"]["side_effect_mean_change"] is not None
    effects = json.loads((out / "eval" / "pmc" / "side_effects.json").read_text())
    assert effects["base"] == str(out / "finetuned")  # side_effects_against's default
    table = (out / "results.md").read_text()
    for label in ("real_authors recall", "world_facts recall", "utility, the paper's composite",
                  "neighbour knowledge vs fine-tuned", "MC: true answer most likely", "TOFU model utility",
                  "TOFU forget quality", "TOFU privleak"):
        assert label in table
    for method in ("pmc", "pmc-fast"):  # the curves: before unlearning, then each evaluated epoch
        run = out / "runs" / method
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        points = benchmark["report"]["curves"][method]
        assert [p["epoch"] for p in points] == [0, 1, 2]
        assert points[0]["eval_unlearn_quality"] == json.loads((run / "eval_before.json").read_text())[
            "eval_unlearn_quality"]
        assert [p["eval_real_authors"] for p in points[1:]] == [line["eval_real_authors"] for line in logged]
        curve_rows = table.split("Greedy scores during unlearning")[1].splitlines()
        assert sum(line.startswith(f"| {method} | ") for line in curve_rows) == 3
    # the Figure 3 view: PMC and PMC-fast are one method, its front over both trials' evaluated epochs
    fronts = benchmark["report"]["fronts"]
    assert sorted((p["trial"], p["epoch"]) for p in fronts) == [(m, e) for m in ("pmc", "pmc-fast") for e in (1, 2)]
    assert {p["method"] for p in fronts} == {"pmc"} and any(p["method_front"] for p in fronts)
    assert "Each method's front over every evaluated epoch" in table
    # each method's chosen trial (one seed here): the rule on the final columns, summarised over its runs
    floor = 0.9 * columns["finetuned"]["utility"]
    kept = [m for m in ("pmc", "pmc-fast") if columns[m]["utility"] >= floor]
    expected = max(kept, key=lambda m: columns[m]["unlearn_quality"]) if kept else \
        max(("pmc", "pmc-fast"), key=lambda m: columns[m]["utility"])
    chosen = benchmark["report"]["chosen"]
    assert list(chosen) == ["pmc"] and chosen["pmc"]["trial"] == expected and chosen["pmc"]["runs"] == [expected]
    assert chosen["pmc"]["metrics"]["unlearn_quality"]["mean"] == columns[expected]["unlearn_quality"]
    assert f"pmc: {expected} (1 seed)" in table
    for png in ("curves.png", "pareto.png", "comparison.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_running_it_again_skips_every_finished_stage(benchmark):
    changed = [p for p, stamp in benchmark["stamps"].items()
               if p.stat().st_mtime_ns != stamp and p.name != "results.json"]
    assert changed == []
    assert benchmark["again"]["columns"] == benchmark["report"]["columns"]
    # what the estimate and the time left count: the stages still to run, here none
    stages = Stages(benchmark["cfg"], Path(benchmark["cfg"].model))
    assert [s for s in stages.estimate_seconds() if not stages.finished(s)] == []


def test_an_out_dir_with_other_settings_or_too_few_rows_is_refused(tmp_path, tiny_model_dir, tofu_dir):
    from pmc_pipeline.recipes.tofu_real import _claim

    _claim(tmp_path / "bench", tiny_benchmark(tmp_path / "bench", tiny_model_dir, tofu_dir))
    with pytest.raises(PMCError, match=r"holds a tofu-real benchmark with other settings \(seed; "):
        run_tofu_real(tiny_benchmark(tmp_path / "bench", tiny_model_dir, tofu_dir, seed=5))
    assert [p.name for p in (tmp_path / "bench").iterdir()] == ["tofu_real.yaml"]
    other = tmp_path / "other"
    with pytest.raises(PMCError, match=f"forget_split=forget01: 40 rows hold fewer than the 3 author\\(s\\) x "
                                       f"{QUESTIONS_PER_AUTHOR}"):
        run_tofu_real(tiny_benchmark(other, tiny_model_dir, tofu_dir, forget_authors=3))
    assert not other.exists()  # checked before anything is written


def test_a_method_may_be_added_to_a_finished_benchmark_but_not_changed(tmp_path, tiny_model_dir, tofu_dir):
    from omegaconf import OmegaConf

    from pmc_pipeline.recipes.tofu_real import _claim

    out = tmp_path / "bench"
    first = tiny_benchmark(out, tiny_model_dir, tofu_dir, methods={"pmc": {}})
    _claim(out, first)
    _claim(out, tiny_benchmark(out, tiny_model_dir, tofu_dir, methods={"pmc": {}, "pmc-fast": {"pmc": {"fast": True}}}))
    assert OmegaConf.load(out / "tofu_real.yaml").methods == {"pmc": {}, "pmc-fast": {"pmc": {"fast": True}}}
    with pytest.raises(PMCError, match=r"other settings \(methods.pmc;"):
        _claim(out, tiny_benchmark(out, tiny_model_dir, tofu_dir, methods={"pmc": {"pmc": {"min_len": 1}}}))


def test_an_out_dir_from_before_a_setting_existed_continues_while_it_keeps_its_default(tmp_path, tiny_model_dir,
                                                                                      tofu_dir):
    from omegaconf import OmegaConf

    from pmc_pipeline.recipes.tofu_real import _claim

    out = tmp_path / "bench"
    _claim(out, tiny_benchmark(out, tiny_model_dir, tofu_dir))
    saved = OmegaConf.to_container(OmegaConf.load(out / "tofu_real.yaml"))
    del saved["side_effects_against"]  # as written by a pmc without the setting
    (out / "tofu_real.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    _claim(out, tiny_benchmark(out, tiny_model_dir, tofu_dir))
    with pytest.raises(PMCError, match=r"other settings \(side_effects_against;"):
        _claim(out, tiny_benchmark(out, tiny_model_dir, tofu_dir, side_effects_against="retain-model"))


def test_side_effects_are_measured_against_the_chosen_model(tmp_path, tofu_dir):
    out = tmp_path / "bench"
    for against, folder in (("finetuned", out / "finetuned"), ("retain-model", out / "retain-model")):
        stages = Stages(tiny_benchmark(out, "base-model", tofu_dir, side_effects_against=against), Path("base-model"))
        assert stages.evaluate_config("pmc").probes.side_effect_base == str(folder)
        assert stages.evaluate_config("finetuned").probes.side_effect_base is None  # a reference model: none
    with pytest.raises(ConfigError, match="side_effects_against"):
        tiny_benchmark(out, "base-model", tofu_dir, side_effects_against="base")


def test_the_shipped_benchmark_builds_every_stage_with_the_issues_settings(tmp_path, tofu_dir):
    from pmc_pipeline.recipes.tofu_real import load_tofu_real_config

    cfg = load_tofu_real_config("smollm2", [f"tofu_dir={tofu_dir}", f"out_dir={tmp_path / 'bench'}"])
    stages = Stages(cfg, Path("base-model"))
    assert list(stages.unlearn) == ["pmc", "pmc-align", "pmc-fast"]
    pmc = stages.unlearn["pmc"]
    assert (pmc.sampling.num_samples, pmc.sampling.temperature, pmc.trainer.learning_rate, pmc.pmc.lambda_retain,
            pmc.pmc.min_len, pmc.sampling.max_tokens) == (4, 1.25, 1e-4, 1.0, 3, 48)
    assert stages.unlearn["pmc-fast"].pmc.fast and stages.unlearn["pmc-align"].pmc.lambda_align > 0
    assert (stages.finetune.epochs, stages.finetune.trainer.learning_rate) == (5, 1e-4)
    # the retain model: the same fine-tuning on the retain authors only; every other evaluation compares with it
    retain = stages.finetune_retain
    assert retain.data.train == str(stages.files["retain"]) and stages.finetune.data.train == str(stages.files["train"])
    assert config_module.to_dict(retain.trainer) == config_module.to_dict(stages.finetune.trainer)
    assert retain.epochs == stages.finetune.epochs and retain.model.path == stages.finetune.model.path
    for name in ("base", "finetuned", "pmc"):
        assert stages.evaluate_config(name).evaluation.retain_model_eval == str(stages.eval_dirs["retain-model"])
    assert stages.evaluate_config("retain-model").evaluation.retain_model_eval is None
    assert stages.evaluate_config("base").model.path == "base-model"
    assert stages.evaluate_config("pmc").attack.k == 8
    assert all(seconds > 0 for seconds in stages.estimate_seconds().values())
    assert not any(stages.finished(stage) for stage in stages.estimate_seconds())
    # the measured PMC-only run: the same settings but for the methods, so `smollm2` adds to its out_dir
    # and the search's settings: smollm2's methods and one more, so all share one out_dir too
    same = [f"tofu_dir={tofu_dir}", f"out_dir={tmp_path / 'bench'}"]
    pmc_only, search = load_tofu_real_config("smollm2-pmc", same), load_tofu_real_config("smollm2-search", same)
    assert list(pmc_only.methods) == ["pmc"] and pmc_only.methods["pmc"] == cfg.methods["pmc"]
    assert search.methods == {**cfg.methods, "pmc-retain3": {"pmc": {"lambda_retain": 3.0}}}
    for other in (pmc_only, search):
        assert {k: v for k, v in vars(other).items() if k != "methods"} == \
            {k: v for k, v in vars(cfg).items() if k != "methods"}


def test_a_baseline_method_gets_the_forget_answers_and_pmc_never(tmp_path, tofu_dir):
    """Baselines run beside PMC from the same fine-tuned checkpoint; those that train on the true forget
    answers get the forget file with them, PMC and IDK the questions alone."""
    cfg = tiny_benchmark(tmp_path / "bench", "base-model", tofu_dir, methods={
        "pmc": {}, "npo": {"method": "npo", "baseline": {"epochs": 2}}, "idk": {"method": "idk"}})
    stages = Stages(cfg, Path("base-model"))
    assert stages.unlearn["npo"].data.forget == str(stages.files["forget"])
    assert stages.unlearn["pmc"].data.forget == str(stages.files["forget_questions"])
    assert stages.unlearn["idk"].data.forget == str(stages.files["forget_questions"])
    assert stages.unlearn["npo"].model.path == stages.unlearn["pmc"].model.path == str(stages.finetuned)
    estimate = stages.estimate_seconds()
    assert 0 < estimate["unlearn npo"] < estimate["unlearn pmc"] * 2  # 2 epochs, no sampling


class CountedRanks:
    def __init__(self, events: list):
        self.events = events

    def close(self) -> None:
        self.events.append("ranks ended")


class RecordingSession:
    """What run_tofu_real does with a session it opened: its kept ranks' ends, among the stages."""

    def __init__(self, events: list):
        self.events, self.kept_ranks = events, CountedRanks(events)

    def close(self) -> None:
        self.events.append("session closed")


def fake_evaluation(scores: dict[str, tuple[float, float]]):
    """An evaluate_stage that writes only (unlearn quality, utility) from `scores` (default 50, 50)."""
    def evaluate(stages, name, session, clock):
        quality, utility = scores.get(name, (50.0, 50.0))
        folder = stages.eval_dirs[name]
        if (folder / "eval.json").is_file():
            return False
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval.json").write_text(json.dumps({"unlearn_quality": {"value": quality},
                                                      "utility": {"value": utility}, "tofu": {}}))
        return True
    return evaluate


def test_each_methods_chosen_trial_is_run_again_with_more_seeds_after_the_grid(monkeypatch, caplog, tmp_path,
                                                                               tiny_model_dir, tofu_dir):
    """After every trial, each method's chosen trial (the most forgetting one above the utility floor) runs
    again with seeds 1.. from the same checkpoint; running the command again runs nothing."""
    from pmc_pipeline.recipes import finetune, roles, tofu_real, unlearn, unlearn_run_dir

    events: list = []
    caplog.set_level(logging.INFO, logger="pmc_pipeline.recipes.tofu_real")
    monkeypatch.setattr(roles, "open_session", lambda cfg: RecordingSession([]))
    monkeypatch.setattr(finetune, "run_finetune", lambda cfg, s: Path(cfg.output_dir, "config.json").parent.mkdir(
        parents=True, exist_ok=True) or Path(cfg.output_dir, "config.json").write_text("{}"))
    monkeypatch.setattr(unlearn, "check_unlearn", lambda cfg: None)
    monkeypatch.setattr(unlearn, "run_unlearning", lambda cfg, s, c: events.append((Path(cfg.run_dir).name, cfg.seed)))
    ran = lambda run_dir, ul: any(e[0] == Path(run_dir).name for e in events)  # noqa: E731
    monkeypatch.setattr(unlearn_run_dir, "run_is_complete", ran)
    monkeypatch.setattr(unlearn_run_dir, "prepare_run_dir", lambda run_dir, ul: "complete" if ran(run_dir, ul) else "new")
    reports = []  # each report: the models it has columns for, and each method's chosen runs
    monkeypatch.setattr(tofu_real, "write_report",
                        lambda out, eval_dirs, trials, *args, **kwargs: reports.append((list(eval_dirs), kwargs["chosen"])))
    # finetuned utility 50: the floor is 45. pmc-fast forgets more but falls below it; npo-hi keeps it
    monkeypatch.setattr(tofu_real, "evaluate_stage", fake_evaluation({
        "pmc": (80.0, 48.0), "pmc-fast": (95.0, 40.0), "npo-lo": (60.0, 40.0), "npo-hi": (70.0, 44.0)}))
    methods = {"pmc": {}, "pmc-fast": {"pmc": {"fast": True}}, "npo-lo": {"method": "npo"},
               "npo-hi": {"method": "npo", "seed": 7}}
    cfg = tiny_benchmark(tmp_path / "bench", tiny_model_dir, tofu_dir, methods=methods, seeds_at_chosen_trial=3)
    run_tofu_real(cfg)
    grid = [("pmc", 0), ("pmc-fast", 0), ("npo-lo", 0), ("npo-hi", 7)]
    # pmc keeps the floor (pmc-fast does not); no npo trial keeps it, so its highest utility: npo-hi, seeds 8, 9
    # seed-major, so that a run stopped part-way has a second seed of every method before a third of any
    assert events == grid + [("pmc-seed1", 1), ("npo-hi-seed8", 8), ("pmc-seed2", 2), ("npo-hi-seed9", 9)]
    final = {"pmc": ["pmc", "pmc-seed1", "pmc-seed2"], "npo": ["npo-hi", "npo-hi-seed8", "npo-hi-seed9"]}
    # a report after each trial and seed run: the chosen trials among the trials evaluated so far, each with
    # its evaluated seed runs (none until the grid is done)
    assert [chosen for _, chosen in reports[:4]] == [{"pmc": ["pmc"]}] * 2 + [{"pmc": ["pmc"], "npo": ["npo-lo"]},
                                                                              {"pmc": ["pmc"], "npo": ["npo-hi"]}]
    assert [chosen for _, chosen in reports[4:]] == [
        {"pmc": ["pmc", "pmc-seed1"], "npo": ["npo-hi"]}, {"pmc": ["pmc", "pmc-seed1"], "npo": final["npo"][:2]},
        {"pmc": final["pmc"], "npo": final["npo"][:2]}, final, final]  # the last: the run's end
    models = ["retain-model", "base", "finetuned", *methods, *final["pmc"][1:], *final["npo"][1:]]
    assert reports[-1][0] == models
    run_tofu_real(cfg)  # again: nothing runs, one report with every seed run in it, nothing left in the estimate
    assert len(events) == 8 and len(reports) == 10 and reports[-1] == (models, final)
    estimates = [r.getMessage() for r in caplog.records if "rough estimate" in r.getMessage()]
    assert "seeds pmc " in estimates[0] and "seeds npo " in estimates[0] and estimates[1].endswith("(none left)")
    with pytest.raises(PMCError, match="seeds_at_chosen_trial=2 is below out_dir .* 3: the count may only grow"):
        run_tofu_real(tiny_benchmark(tmp_path / "bench", tiny_model_dir, tofu_dir, methods=methods,
                                     seeds_at_chosen_trial=2))


def test_a_seed_run_may_not_take_the_name_of_another_setting(tmp_path, tiny_model_dir, tofu_dir):
    same = {"pmc": {}, "pmc-seed1": {"seed": 1}}  # the seed run itself, declared by hand: allowed
    other = {"pmc": {}, "pmc-seed1": {"pmc": {"fast": True}}}
    out = tmp_path / "bench"
    check_seed_names(same, {"pmc": 0, "pmc-seed1": 1}, 2)
    with pytest.raises(PMCError, match=r"methods.pmc-seed1: the name of trial pmc's seed run"):
        run_tofu_real(tiny_benchmark(out, tiny_model_dir, tofu_dir, methods=other, seeds_at_chosen_trial=2))
    assert not out.exists()  # refused before anything is written
    check_seed_names(other, {"pmc": 0, "pmc-seed1": 0}, 1)  # one seed: no seed runs


@pytest.mark.parametrize("owned", [True, False])
def test_a_benchmark_that_owns_its_session_trains_every_job_on_new_ranks(monkeypatch, tmp_path, tiny_model_dir,
                                                                        tofu_dir, owned):
    """Kept ranks grow job after job (docs/results.md), so `pmc tofu-real` ends them after each training job;
    a lent session's ranks (tests', the demo's) are left to their owner."""
    from pmc_pipeline.recipes import finetune, roles, tofu_real, unlearn

    events: list = []
    session = RecordingSession(events)
    monkeypatch.setattr(roles, "open_session", lambda cfg: session)
    monkeypatch.setattr(finetune, "run_finetune", lambda cfg, s: events.append(f"finetune {Path(cfg.output_dir).name}"))
    monkeypatch.setattr(unlearn, "check_unlearn", lambda cfg: None)
    monkeypatch.setattr(unlearn, "run_unlearning", lambda cfg, s, c: events.append(f"unlearn {Path(cfg.run_dir).name}"))
    monkeypatch.setattr(tofu_real, "evaluate_stage", fake_evaluation({}))
    monkeypatch.setattr(tofu_real, "write_report", lambda *args, **kwargs: {})
    run_tofu_real(tiny_benchmark(tmp_path / "bench", tiny_model_dir, tofu_dir), None if owned else session)
    jobs = ["finetune retain-model", "finetune finetuned", "unlearn pmc", "unlearn pmc-fast"]
    if owned:
        assert events == [e for job in jobs for e in (job, "ranks ended")] + ["session closed"]
    else:
        assert events == jobs


def test_a_method_may_draw_its_own_seed_from_the_same_checkpoint(tmp_path, tofu_dir):
    """Seeds of one setting are methods with a `seed`: their unlearning draws differ, everything else is the
    benchmark's (the fine-tunes and every evaluation keep its seed)."""
    cfg = tiny_benchmark(tmp_path / "bench", "base-model", tofu_dir, seed=4,
                         methods={"pmc": {}, "pmc-seed1": {"seed": 1}})
    stages = Stages(cfg, Path("base-model"))
    assert (stages.unlearn["pmc"].seed, stages.unlearn["pmc-seed1"].seed) == (4, 1)
    assert stages.finetune.seed == stages.finetune_retain.seed == 4
    assert stages.evaluate_config("pmc-seed1").seed == stages.evaluate_config("pmc").seed == 4
    assert stages.unlearn["pmc-seed1"].model.path == stages.unlearn["pmc"].model.path


def test_the_comparison_gives_every_method_the_same_learning_rate_grid(tmp_path, tofu_dir):
    from pmc_pipeline.method.config import METHODS
    from pmc_pipeline.recipes.tofu_real import load_tofu_real_config

    same = [f"tofu_dir={tofu_dir}", f"out_dir={tmp_path / 'bench'}"]
    compare = load_tofu_real_config("smollm2-compare", same)
    stages = Stages(compare, Path("base-model"))
    grid: dict[str, list[float]] = {}
    for ul in stages.unlearn.values():
        grid.setdefault(ul.method, []).append(ul.trainer.learning_rate)
        assert ul.model.path == str(stages.finetuned)
        if ul.method != "pmc":
            assert (ul.baseline.epochs, ul.evaluation.eval_every, ul.baseline.lambda_retain) == (10, 5, None)
    assert set(grid) == set(METHODS) and all(sorted(lrs) == [3e-5, 1e-4] for lrs in grid.values())
    # side effects as the paper's Fig. 5a: against the retain model; each chosen trial with 3 seeds; every
    # other setting is smollm2-pmc's
    assert stages.evaluate_config("npo").probes.side_effect_base == str(stages.retain_model)
    assert compare.seeds_at_chosen_trial == 3
    pmc_only = load_tofu_real_config("smollm2-pmc", same)
    own = ("methods", "side_effects_against", "seeds_at_chosen_trial")
    assert {k: v for k, v in vars(compare).items() if k not in own} == \
        {k: v for k, v in vars(pmc_only).items() if k not in own}


def test_the_default_benchmark_is_pmc_beside_the_chosen_keep_setting(monkeypatch, capsys, tmp_path, tofu_dir):
    """`pmc tofu-real tofu_dir=D` (no name) runs the best measured keep setting beside plain PMC, with
    smollm2-keep's settings, so that either command continues the other's out_dir; it prints the table."""
    from pmc_pipeline import cli
    from pmc_pipeline.recipes import tofu_real

    ran = []

    def run(cfg):
        ran.append(cfg)
        (tmp_path / "bench").mkdir()
        (tmp_path / "bench" / "results.md").write_text("| metric | pmc |\n")

    monkeypatch.setattr(tofu_real, "run_tofu_real", run)
    same = [f"tofu_dir={tofu_dir}", f"out_dir={tmp_path / 'bench'}"]
    assert cli.main(["tofu-real", *same]) == 0
    assert "| metric | pmc |" in capsys.readouterr().out
    default = config_module.to_dict(ran[0])
    keep = config_module.to_dict(tofu_real.load_tofu_real_config("smollm2-keep", same))
    assert default["methods"] == {m: keep["methods"][m] for m in ("pmc", "pmc-keep-kl")}
    assert {k: v for k, v in default.items() if k != "methods"} == {k: v for k, v in keep.items() if k != "methods"}
    assert (default["tofu_dir"], default["out_dir"]) == (str(tofu_dir), str(tmp_path / "bench"))


def test_a_keep_method_trains_on_the_selection_halves_and_every_result_is_on_the_report_halves(tmp_path, tofu_dir):
    from pmc_pipeline.data.neighbour_halves import half_rows
    from pmc_pipeline.recipes.tofu_real import load_tofu_real_config

    cfg = load_tofu_real_config("smollm2-keep", [f"tofu_dir={tofu_dir}", f"out_dir={tmp_path / 'bench'}"])
    stages = Stages(cfg, Path("base-model"))
    keepers = ["pmc-keep-kl", "pmc-keep", "pmc-fast-keep-kl", "pmc-fast-keep3-kl"]
    assert list(stages.unlearn) == ["pmc", "pmc-keep-kl", "pmc-keep", "pmc-kl", "pmc-fast-keep-kl",
                                    "pmc-fast-keep3-kl", "pmc-fast-kl"] and stages.keep_methods == keepers
    assert {m for m, ul in stages.unlearn.items() if ul.data.keep is None} == {"pmc", "pmc-kl", "pmc-fast-kl"}
    assert {stages.unlearn[m].data.keep for m in keepers} == {str(stages.files["keep"])}
    assert [m for m, ul in stages.unlearn.items() if ul.retain_loss == "kl"] == [
        "pmc-keep-kl", "pmc-kl", "pmc-fast-keep-kl", "pmc-fast-keep3-kl", "pmc-fast-kl"]
    assert [m for m, ul in stages.unlearn.items() if ul.pmc.fast] == ["pmc-fast-keep-kl", "pmc-fast-keep3-kl",
                                                                       "pmc-fast-kl"]
    assert [ul.pmc.lambda_keep for ul in stages.unlearn.values()] == [1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0]
    # the keep questions: the selection halves, questions only; the evaluations read the report halves
    keep = stages.keep_rows()
    assert all(list(row) == ["question"] for row in keep)
    reported = set()
    for split in ("real_authors", "world_facts"):
        questions = [json.loads(line)["question"] for line in (tofu_dir / f"{split}.json").read_text().splitlines()]
        reported |= {questions[i] for i in half_rows(split, len(questions), "report", 0)}
    assert len(keep) == 50 + 59 and not {row["question"] for row in keep} & reported
    for name in ("finetuned", "pmc-keep"):
        assert stages.evaluate_config(name).evaluation.neighbour_half == "report"
    assert {ul.evaluation.neighbour_half for ul in stages.unlearn.values()} == {"report"}
    # a keep method with results on every question (or on another seed's halves) is refused in one line
    for wrong in (["evaluate.evaluation.neighbour_half=all"], ["unlearn.evaluation.neighbour_seed=3"]):
        bad = load_tofu_real_config("smollm2-keep", [f"tofu_dir={tofu_dir}", f"out_dir={tmp_path / 'b'}", *wrong])
        with pytest.raises(ConfigError, match=r"^methods.pmc-keep-kl trains on the selection halves of "
                                              r"real_authors and world_facts \(data.keep: neighbour_selection\), so results are "
                                              r"reported on the other halves: (evaluate|methods.pmc) has"):
            Stages(bad, Path("base-model"))
