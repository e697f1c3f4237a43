"""The yardstick of issue "Forget the target, keep its neighbours": real_authors and world_facts cut by a
fixed seed into a selection half and a report half that never overlap, taken alike from the greedy
and the likelihood-scored splits; bootstrap intervals over questions (no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pmc_pipeline.data.eval_splits import load_eval_data
from pmc_pipeline.data.neighbour_halves import half_rows
from pmc_pipeline.errors import DataError
from pmc_pipeline.eval.intervals import mean_interval, relative_change_interval
from pmc_pipeline.schema import DataConfig, EvalConfig


@pytest.mark.parametrize("rows", [100, 117, 1, 2])
def test_the_halves_never_overlap_and_cover_every_row(rows):
    selection, report = half_rows("world_facts", rows, "selection", 0), half_rows("world_facts", rows, "report", 0)
    assert not set(selection) & set(report) and sorted(selection + report) == list(range(rows))
    assert len(selection) == (rows + 1) // 2 and selection == sorted(selection)
    assert half_rows("world_facts", rows, "selection", 0) == selection  # fixed by the seed
    assert half_rows("world_facts", rows, "all", 0) is None


def test_the_cut_depends_on_the_seed_and_the_split_and_is_not_the_first_half():
    first = half_rows("real_authors", 100, "selection", 0)
    assert first != list(range(50))
    assert half_rows("real_authors", 100, "selection", 1) != first
    assert half_rows("world_facts", 100, "selection", 0) != first


def test_tofu_neighbours_are_halved_alike_in_greedy_and_likelihood_splits(tofu_dir):
    data_cfg = DataConfig(tofu_dir=str(tofu_dir))
    halves = {half: load_eval_data(EvalConfig(neighbour_half=half), data_cfg, "forget01", with_options=True)
              for half in ("all", "selection", "report")}
    for split in ("real_authors", "world_facts"):
        every = halves["all"].splits[split].questions
        selection = halves["selection"].splits[split].questions
        report = halves["report"].splits[split].questions
        assert not set(selection) & set(report) and sorted(selection + report) == sorted(every)
        for half in ("selection", "report"):
            assert halves[half].options[split].questions == halves[half].splits[split].questions
        assert "half" in halves["report"].notes[f"{split}_half"]
    # the forget and retain splits are untouched
    assert halves["report"].splits["forget"].questions == halves["all"].splits["forget"].questions


def test_a_perturbed_companion_in_another_order_is_refused_when_halved(tmp_path, tofu_dir):
    for name in ("real_authors", "real_authors_perturbed"):
        rows = [json.loads(line) for line in (tofu_dir / f"{name}.json").read_text().splitlines()]
        if name.endswith("perturbed"):
            rows = rows[::-1]
        (tmp_path / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("forget01", "forget01_perturbed", "retain90", "retain_perturbed"):
        (tmp_path / f"{name}.json").write_text((tofu_dir / f"{name}.json").read_text())
    cfg = EvalConfig(neighbour_half="report", world_facts=None, world_facts_perturbed=None)
    with pytest.raises(DataError, match="neighbour_half=report it must list the questions of real_authors"):
        load_eval_data(cfg, DataConfig(tofu_dir=str(tmp_path)), "forget01", with_options=True)
    load_eval_data(EvalConfig(world_facts=None, world_facts_perturbed=None), DataConfig(tofu_dir=str(tmp_path)),
                   "forget01", with_options=True)  # unhalved, the order does not matter


def test_the_mean_interval_holds_the_mean_and_narrows_with_more_questions():
    rng = np.random.default_rng(3)
    small, large = rng.random(20), rng.random(2000)
    low, high = mean_interval(small)
    assert low < small.mean() < high
    assert (lambda lo_hi: lo_hi[1] - lo_hi[0])(mean_interval(large)) < (high - low) / 5
    assert mean_interval([0.5] * 10) == (0.5, 0.5)


def test_the_change_interval_keeps_the_pairing():
    """Scores that vary a lot from question to question but all fall by 10%: paired, the interval is
    tight around -10%; resampling the two models' questions independently would straddle 0."""
    rng = np.random.default_rng(0)
    before = rng.random(50) + 0.05
    after = before * 0.9
    low, high = relative_change_interval(after, before)
    assert low == pytest.approx(-0.1, abs=1e-9) and high == pytest.approx(-0.1, abs=1e-9)
    picks = rng.integers(0, 50, size=(2000, 2, 50))
    unpaired = after[picks[:, 0]].mean(1) / before[picks[:, 1]].mean(1) - 1
    assert np.quantile(unpaired, 0.025) < 0 < np.quantile(unpaired, 0.975)
    with pytest.raises(ValueError, match="one per question"):
        relative_change_interval([0.1], [0.1, 0.2])


def test_the_report_gives_each_neighbour_split_its_interval_and_paired_changes():
    from pmc_pipeline.recipes.tofu_real_report import neighbour_intervals

    questions = [f"q{i}" for i in range(30)]
    rng = np.random.default_rng(1)
    finetuned = rng.random(30)

    def evaluation(recalls):
        split = {"generations": [{"question": q, "recall": float(r)} for q, r in zip(questions, recalls)]}
        return {"real_authors": split, "world_facts": None}

    found = neighbour_intervals({"base": evaluation(finetuned * 2), "finetuned": evaluation(finetuned),
                                 "pmc": evaluation(finetuned * 0.5)})
    assert set(found["pmc"]) == {"real_authors"}  # world_facts was not evaluated
    pmc = found["pmc"]["real_authors"]
    assert pmc["n"] == 30 and pmc["recall"]["value"] == pytest.approx(finetuned.mean() * 0.5)
    low, high = pmc["recall"]["interval"]
    assert low < pmc["recall"]["value"] < high
    assert pmc["vs_finetuned"]["value"] == pytest.approx(-0.5)
    assert pmc["vs_finetuned"]["interval"] == pytest.approx([-0.5, -0.5])
    assert pmc["vs_base"]["value"] == pytest.approx(-0.75)
    assert found["finetuned"]["real_authors"]["vs_finetuned"]["value"] == pytest.approx(0.0)
