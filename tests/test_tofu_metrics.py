"""TOFU's standard metrics on hand-made log-probs: each formula, told apart from its plausible wrong
variants; and the new input rules (one line each, before any engine starts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from pmc_pipeline.data.eval_splits import load_eval_data
from pmc_pipeline.errors import DataError
from pmc_pipeline.eval import tofu_metrics as tm
from pmc_pipeline.eval.config import EvalConfig
from pmc_pipeline.eval.tofu_standard import EXAMPLES_FILE, load_retain_model_eval, question_key, tofu_standard_metrics
from pmc_pipeline.schema import DataConfig


def test_answer_probability_is_the_per_token_mean_not_the_sum():
    assert tm.answer_probability([-1.0, -3.0]) == pytest.approx(math.exp(-2.0))  # summed would be exp(-4)


def test_truth_ratio_takes_the_geometric_mean_over_perturbed_answers():
    # perturbed p = e^-1 and e^-3: geometric mean e^-2 = p(correct) -> 1; the arithmetic mean would give 1.54
    assert tm.truth_ratio([-2.0, -2.0], [[-1.0], [-3.0, -3.0]]) == pytest.approx(1.0)
    assert tm.truth_ratio([-1.0], [[-2.0]]) == pytest.approx(math.exp(-1.0))  # perturbed / correct, not inverted


def test_forget_and_retain_aggregates():
    ratios = [0.5, 2.0]
    assert tm.forget_truth_ratio_score(ratios) == pytest.approx(0.5)  # min(TR, 1/TR); max(0, 1-TR) gives 0.25
    assert tm.truth_ratio_score(ratios) == pytest.approx(0.25)  # max(0, 1-TR); min(TR, 1/TR) gives 0.5


def test_normalised_probability_shares_the_options():
    share = tm.normalised_probability([math.log(0.6)], [[math.log(0.2)], [math.log(0.2)]])
    assert share == pytest.approx(0.6)


def test_model_utility_is_the_harmonic_mean_and_a_zero_makes_it_zero():
    assert tm.model_utility([1.0, 0.25]) == pytest.approx(0.4)  # the arithmetic mean would be 0.625
    assert tm.model_utility([0.9] * 8 + [0.0]) == 0.0


def test_forget_quality_tests_the_raw_truth_ratios():
    unlearned, retain_model = [0.5, 0.45, 0.55, 0.5, 0.52], [2.0, 2.2, 1.9, 2.1, 2.0]
    # raw ratios differ completely; min(TR, 1/TR) of both is ~0.5 and would look identical
    assert tm.forget_quality(unlearned, retain_model) < 0.01
    assert tm.forget_quality(retain_model, retain_model) == 1.0  # the retain model against itself


def test_extraction_strength_counts_the_correct_suffix():
    assert tm.extraction_strength([False, True, True]) == pytest.approx(2 / 3)
    assert tm.extraction_strength([True, False, True]) == pytest.approx(1 / 3)  # not the share of hits (2/3)
    assert tm.extraction_strength([True] * 4) == 1.0 and tm.extraction_strength([False] * 4) == 0.0


def test_min_k_score_and_membership():
    assert tm.min_k_score([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(4.5)  # lowest 40%: -5, -4
    assert tm.min_k_score([-1.0]) == pytest.approx(1.0)  # at least one token
    memorised = tm.membership_auc([0.1, 0.2, 0.3], [2.0, 3.0, 4.0])  # forget answers far likelier
    assert memorised == 1.0 and tm.membership_auc([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert tm.privleak(0.5, 0.5) == 0.0 and tm.privleak(1.0, 0.5) == pytest.approx(-100.0)


class ScriptedRollout:
    """answer_logprob_ranks from a table: each option text -> (per-token log-prob, argmax hit)."""

    def __init__(self, formatter, table: dict[str, tuple[float, bool]]):
        self.formatter, self.table, self.calls = formatter, table, 0

    def answer_logprob_ranks(self, sequences):
        self.calls += 1
        rows = []
        for ids, start in sequences:
            text = self.formatter.tokenizer.decode(ids, skip_special_tokens=True)
            option = next(o for o in sorted(self.table, key=len, reverse=True) if text.rstrip().endswith(o))
            lp, hit = self.table[option]
            rows.append([(lp, 1 if hit else 5)] * (len(ids) - start))
        return rows

    def greedy(self, prompt_ids, max_tokens):
        raise AssertionError("every ROUGE value was expected from the greedy splits")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tofu"
    folder.mkdir()
    forget = [{"question": f"Who wrote book {i}?", "answer": f"Ann{i} wrote it.", "paraphrased_answer": f"It was Ann{i}.",
               "paraphrased_question": f"Book {i} was written by whom?",
               "perturbed_answer": [f"It was Bob{i}.", f"It was Cid{i}."]} for i in range(3)]
    _write(folder / "forget.json", [{k: r[k] for k in ("question", "answer")} for r in forget])
    _write(folder / "forget_perturbed.json", forget)
    _write(folder / "retain.json", [{"question": "Where is X?", "answer": "In Y."}])
    _write(folder / "retain_perturbed.json", [{"question": "Where is X?", "answer": "In Y.", "paraphrased_answer": "Y.",
                                               "perturbed_answer": ["Z.", "W."]}])
    for name in ("real_authors", "world_facts"):
        _write(folder / f"{name}_perturbed.json", [{"question": f"{name}?", "answer": "Yes.", "perturbed_answer": ["No."]}])
        _write(folder / f"{name}.json", [{"question": f"{name}?", "answer": "Yes."}])
    return folder


def _data(folder: Path, **evaluation):
    cfg = OmegaConf.structured(EvalConfig(retain_short_indices=None, **evaluation))
    data_cfg = OmegaConf.structured(DataConfig(tofu_dir=str(folder), retain="retain", forget="forget"))
    return load_eval_data(cfg, data_cfg, "forget", with_options=True)


def test_the_metrics_from_one_scripted_engine_call(tmp_path, tiny_model_dir):
    from pmc_pipeline.data.prompts import PromptFormatter
    from pmc_pipeline.models.source import load_tokenizer

    folder = _folder(tmp_path)
    data = _data(folder)
    formatter = PromptFormatter(load_tokenizer(str(tiny_model_dir)), "plain")
    table = {"In Y.": (-0.1, True), "Y.": (-0.2, True), "Z.": (-2.0, False), "W.": (-2.0, False),
             "Yes.": (-0.5, True), "No.": (-1.5, False)}
    for i in range(3):
        table.update({f"Ann{i} wrote it.": (-0.3, True), f"It was Ann{i}.": (-1.0, False),
                      f"It was Bob{i}.": (-1.0, False), f"It was Cid{i}.": (-1.0, False)})
    rollout = ScriptedRollout(formatter, table)
    greedy = {split: {"generations": [{"question": q, "answer": a, "recall": 0.5}
                                      for q, a in zip(data.splits[split].questions, data.splits[split].answers)]}
              for split in ("retain_short", "real_authors", "world_facts")}
    summary, rows = tofu_standard_metrics(rollout, formatter, data, greedy, 16, None)
    assert rollout.calls == 1  # every option of every split in one batched call
    assert summary["forget"]["truth_ratio"] == pytest.approx(1.0)  # perturbed as likely as the paraphrase
    assert summary["forget"]["probability"] == pytest.approx(math.exp(-0.3))
    assert summary["forget"]["extraction_strength"] == 1.0
    assert summary["retain"]["truth_ratio"] == pytest.approx(1 - math.exp(-2.0 + 0.2))
    assert summary["real_authors"]["probability"] == pytest.approx(math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.5)))
    parts = [summary[s][k] for s in ("retain", "real_authors", "world_facts") for k in ("probability", "rouge", "truth_ratio")]
    assert summary["model_utility"] == pytest.approx(len(parts) / sum(1 / p for p in parts))
    assert summary["forget_quality"] is None and "retain_model_eval" in summary["forget_quality_note"]
    assert [r["question"] for r in rows if r["split"] == "forget"] == [question_key(q) for q in data.options["forget"].questions]
    assert not any("Ann" in json.dumps(r) for r in rows)  # no answer text in the per-example file

    # the retain model's evaluation (here: this one) as the reference: forget quality 1.0 against itself
    own = tmp_path / "eval-retain"
    own.mkdir()
    _write(own / EXAMPLES_FILE, rows)
    (own / "eval.json").write_text(json.dumps({"tofu": summary}))
    again, _ = tofu_standard_metrics(rollout, formatter, data, greedy, 16,
                                     load_retain_model_eval(str(own), data.options["forget"]))
    assert again["forget_quality"] == 1.0


def test_input_rules_fail_early_in_one_line(tmp_path):
    folder = _folder(tmp_path)
    bare = _write(tmp_path / "retain_bare.json", [{"question": "Where is X?", "answer": "In Y."}])
    with pytest.raises(DataError, match=r"^evaluation tofu_metrics retain .*retain_bare.json: line 1: no "
                                        r"'paraphrased_answer' field \(TOFU's truth ratio needs") as named:
        _data(folder, retain_perturbed=str(bare))
    assert "\n" not in str(named.value)
    # an auto split without the fields is skipped with the reason, as the multiple-choice probe is
    _write(folder / "world_facts_perturbed.json", [{"question": "w?", "answer": "Yes."}])
    assert _data(folder).notes["tofu_world_facts"] == "split 'world_facts_perturbed' has no 'perturbed_answer' field"

    holdout = _write(tmp_path / "holdout.json", [{"question": "New?", "answer": "N."}, {"question": "Where is X?", "answer": "In Y."}])
    with pytest.raises(DataError, match=r"^evaluation holdout .*holdout.json: line 2: the question is also in the "
                                        r"training data \(.*retain.json line 1\)"):
        _data(folder, holdout=str(holdout))

    other = tmp_path / "eval-other"
    other.mkdir()
    _write(other / EXAMPLES_FILE, [{"split": "forget", "question": question_key("Something else?"), "truth_ratio": 1.0}])
    (other / "eval.json").write_text("{}")
    forget = _data(folder).options["forget"]
    with pytest.raises(DataError, match=r"^evaluation.retain_model_eval .*eval-other: its forget truth ratios are for "
                                        r"other questions \(1 rows vs 3; the first difference at forget row 1\)"):
        load_retain_model_eval(str(other), forget)
    with pytest.raises(DataError, match=f"no {EXAMPLES_FILE}"):
        load_retain_model_eval(str(tmp_path), forget)


def test_tofu_metrics_false_loads_no_likelihood_split(tmp_path):
    data = _data(_folder(tmp_path), tofu_metrics=False, holdout=str(tmp_path / "absent.json"))
    assert not any(data.options.values()) and data.holdout is None  # the holdout setting is not even read
    assert data.notes["tofu_metrics"] == "turned off (evaluation.tofu_metrics=false)"
