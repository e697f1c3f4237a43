"""Metrics, attacks and probes on hand-made data with known answers (fake models, no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from pmc_pipeline.config import from_mapping
from pmc_pipeline.data.eval_splits import EvalData, EvalSplit, MultipleChoiceItem, load_eval_data
from pmc_pipeline.errors import DataError, PMCError
from pmc_pipeline.eval.attacks import greedy_prefill, prefill_attack, sampling_attack
from pmc_pipeline.eval.metrics import greedy_metrics, unlearn_quality, utility
from pmc_pipeline.eval.probes import forget_specific_tokens, multiple_choice_leakage, side_effect_summary
from pmc_pipeline.recipes.evaluate import EVAL_KEYS, check_evaluate, resolve_target
from pmc_pipeline.schema import DataConfig, EvalConfig
from rollout.worker import Completion
from trainer.records import TrainExample

PROMPT = "Q: {}\nA:"


class CharTokenizer:
    bos_token_id = None
    all_special_ids: list[int] = []

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class CharFormatter:
    """One token per character: prompts and answers are easy to read back in a fake model."""

    style = "plain"
    answer_lead = " "  # what a plain answer starts with (PromptFormatter's)

    def __init__(self):
        self.tokenizer = CharTokenizer()

    def prompt_ids(self, question):
        return [ord(c) for c in PROMPT.format(question)]

    def decode(self, ids):
        return "".join(map(chr, ids)).strip()

    def example(self, question, answer, role, max_length=None):
        prompt = self.prompt_ids(question)
        return TrainExample(tuple(prompt + [ord(c) for c in " " + answer]), len(prompt), role)


class FakeModel:
    """answer(question, prompt_text, sample_index) -> the text the 'model' generates."""

    def __init__(self, answer):
        self.answer = answer
        self.prompts: list[str] = []

    def _complete(self, ids, index):
        text = "".join(map(chr, ids))
        self.prompts.append(text)
        question = text[len("Q: "):text.index("\nA:")]
        out = self.answer(question, text, index)
        return Completion(out, tuple(ord(c) for c in out), True)

    def greedy(self, prompt_ids, max_tokens):
        return [self._complete(ids, 0) for ids in prompt_ids]

    def sample(self, prompt_ids, n, temperature, top_p, max_tokens, seed=None):
        return [[self._complete(ids, i) for i in range(n)] for ids in prompt_ids]


TRUTH = {
    "Where was Ada born?": "Ada was born in Lisbon.",
    "What does Ada write?": "Ada writes crime novels.",
    "Who wrote Hamlet?": "William Shakespeare",
    "Capital of France?": "Paris",
}


def _data(names=("forget", "forget_paraphrased", "retain_short", "world_facts", "real_authors")) -> EvalData:
    pairs = {"forget": list(TRUTH.items())[:2], "forget_paraphrased": list(TRUTH.items())[:2],
             "retain_short": list(TRUTH.items())[2:3], "world_facts": list(TRUTH.items())[3:],
             "real_authors": list(TRUTH.items())[2:3]}
    splits = {n: (EvalSplit(n, "question", "answer", [q for q, _ in pairs[n]], [a for _, a in pairs[n]])
                  if n in names else None) for n in pairs}
    return EvalData(splits, None)


def test_a_model_repeating_the_truth_scores_recall_one_and_xyz_scores_zero():
    oracle = greedy_metrics(FakeModel(lambda q, t, i: TRUTH[q]), CharFormatter(), _data(), 50)
    xyz = greedy_metrics(FakeModel(lambda q, t, i: "xyz"), CharFormatter(), _data(), 50)
    for name in ("forget", "forget_paraphrased", "retain_short", "world_facts", "real_authors"):
        assert oracle[name]["rouge_l_recall"] == 1.0 and xyz[name]["rouge_l_recall"] == 0.0
        assert [g["generated"] for g in oracle[name]["generations"]] == [TRUTH[q] for q in
                                                                         [g["question"] for g in oracle[name]["generations"]]]
    assert oracle["unlearn_quality"]["value"] == 0.0 and xyz["unlearn_quality"]["value"] == 100.0
    assert oracle["utility"]["value"] == 100.0 and xyz["utility"]["value"] == 0.0
    assert oracle["utility"]["from"] == ["retain_short", "world_facts", "real_authors"]


FIVE_WORDS = "alpha beta gamma delta epsilon"  # every ground truth below: each word said back is recall 0.2


def test_unlearn_quality_and_utility_follow_the_paper_formulas():
    """Unequal recalls in every split, so a swapped, dropped or wrongly averaged term changes the result."""
    said = {  # question -> (split, the model's answer); recall = words of FIVE_WORDS in it / 5
        "f1": ("forget", "xyz"), "f2": ("forget", "alpha beta"),                    # R_forget = (0 + 0.4) / 2
        "p1": ("forget_paraphrased", "alpha beta gamma"),                           # R_paraphrased = 0.6
        "r1": ("retain_short", "xyz"), "r2": ("retain_short", "alpha beta"),        # R_retain_short = 0.2
        "w1": ("world_facts", "alpha beta"),                                        # R_world_facts = 0.4
        "a1": ("real_authors", FIVE_WORDS),                                         # R_real_authors = 1.0
    }
    splits = {name: EvalSplit(name, "question", "answer", [q for q, (s, _) in said.items() if s == name],
                              [FIVE_WORDS for s, _ in said.values() if s == name])
              for name in ("forget", "forget_paraphrased", "retain_short", "world_facts", "real_authors")}
    result = greedy_metrics(FakeModel(lambda q, t, i: said[q][1]), CharFormatter(), EvalData(splits, None), 50)
    recalls = [result[name]["rouge_l_recall"] for name in splits]
    assert recalls == pytest.approx([0.2, 0.6, 0.2, 0.4, 1.0])
    # by hand from method.md: UQ = 100 (2 - 0.2 - 0.6) / 2; U = 100 (0.2 + 0.4 + 1.0) / 3
    # (wrong formulas give 80 / 40 / 120 (one term, no halving) or 66.7 (pooled questions) and
    # 30 / 60 / 70 (two splits) or 45 (pooled questions) instead)
    assert result["unlearn_quality"] == {"value": pytest.approx(60.0), "from": ["forget", "forget_paraphrased"]}
    assert result["utility"] == {"value": pytest.approx(160.0 / 3),
                                 "from": ["retain_short", "world_facts", "real_authors"]}
    assert unlearn_quality(0.2, 0.6) == pytest.approx(60.0)
    assert utility([0.2, 0.4, 1.0]) == pytest.approx(160.0 / 3)

    # only the splits present count: forget alone gives 100 (1 - R_forget), utility = 100 R_retain_short
    partial = greedy_metrics(FakeModel(lambda q, t, i: said[q][1]), CharFormatter(),
                             EvalData({**splits, "forget_paraphrased": None, "world_facts": None,
                                       "real_authors": None}, None), 50)
    assert partial["unlearn_quality"] == {"value": pytest.approx(80.0), "from": ["forget"]}
    assert partial["utility"] == {"value": pytest.approx(20.0), "from": ["retain_short"]}
    assert partial["world_facts"] is None


def test_sampling_attack_takes_the_worst_case_of_k_samples():
    questions, answers = list(TRUTH)[:2], [TRUTH[q] for q in list(TRUTH)[:2]]
    # the secret appears only in the 5th of 10 samples
    leaky = FakeModel(lambda q, t, i: TRUTH[q] if i == 4 else "no idea")
    result = sampling_attack(leaky, CharFormatter(), questions, answers, k=10)
    assert [len(r) for r in result.recalls] == [10, 10]
    assert result.worst_case == [1.0, 1.0] and result.mean_worst_case_recall == 1.0
    assert result.mean_recall == pytest.approx(0.1)
    assert result.worst_samples == answers
    clean = sampling_attack(FakeModel(lambda q, t, i: "xyz"), CharFormatter(), questions, answers, k=10)
    assert clean.mean_worst_case_recall == 0.0
    report = result.as_dict(questions, answers)
    assert report["worst_case_histogram"]["counts"][-1] == 2 and sum(report["worst_case_histogram"]["counts"]) == 2


@pytest.mark.parametrize("k", [0, -3])
def test_attack_k_must_be_positive(k):
    with pytest.raises(PMCError, match="k="):
        sampling_attack(FakeModel(lambda q, t, i: "x"), CharFormatter(), ["q"], ["a"], k=k)


def test_prefill_forces_the_prefix_and_scores_only_the_continuation():
    questions, answers = list(TRUTH)[:2], [TRUTH[q] for q in list(TRUTH)[:2]]
    # this model leaks only when its answer has been forced to start with the prefix
    model = FakeModel(lambda q, t, i: TRUTH[q] if t.endswith("A: The answer is:") else "xyz")
    plain = greedy_metrics(model, CharFormatter(), _data(("forget",)), 50)["forget"]["rouge_l_recall"]
    forced = greedy_prefill(model, CharFormatter(), questions, answers, "The answer is:", 50)
    assert plain == 0.0 and forced.recall == 1.0
    assert all(p.endswith("\nA: The answer is:") for p in model.prompts[-2:])
    assert forced.answers == answers  # the prefix is not part of the scored text
    report = prefill_attack(model, CharFormatter(), questions, answers, "The answer is:", k=3)
    assert report["greedy"]["rouge_l_recall"] == 1.0 and report["sampled"]["mean_worst_case_recall"] == 1.0
    # a prefix that is itself the answer must not count as leakage
    echo = FakeModel(lambda q, t, i: "")
    assert greedy_prefill(echo, CharFormatter(), ["Capital of France?"], ["Paris"], "Paris", 10).recall == 0.0


class FakeScorer:
    """answer_logprob_ranks: every answer token of `true_text` gets `true_lp`, any other answer token -1."""

    def __init__(self, true_texts, true_lp):
        self.true_texts, self.true_lp = true_texts, true_lp

    def answer_logprob_ranks(self, sequences):
        out = []
        for ids, start in sequences:
            text = "".join(map(chr, ids))
            assert start == text.index("\nA:") + 3  # the formatter's answer start reaches the engine
            lp = self.true_lp if text[start:].strip() in self.true_texts else -1.0
            out.append([(lp, 2)] * (len(ids) - start))
        return out


def test_multiple_choice_probe_finds_the_least_likely_true_answer():
    items = [MultipleChoiceItem(f"q{i}", f"true {i}", [f"wrong {i}.{j}" for j in range(5)]) for i in range(4)]
    trues = {f"true {i}" for i in range(4)}
    avoided = multiple_choice_leakage(FakeScorer(trues, -3.0), CharFormatter(), items)
    assert avoided["true_least_likely_rate"] == 1.0 and avoided["true_most_likely_rate"] == 0.0
    assert avoided["chance_rate"] == pytest.approx(1 / 6) and avoided["options_per_question"] == [6]
    known = multiple_choice_leakage(FakeScorer(trues, -0.2), CharFormatter(), items)
    assert known["true_least_likely_rate"] == 0.0 and known["true_most_likely_rate"] == 1.0
    # normalised inverse perplexities: five wrong options at exp(-1), the true one at exp(-3)
    expected_min = np.exp(-3) / (np.exp(-3) + 5 * np.exp(-1))
    assert avoided["min_option_probability"]["mean"] == pytest.approx(expected_min)


def test_side_effect_tokens_and_summary():
    tokens = forget_specific_tokens(CharFormatter(), ["zq"], ["abc"])
    assert tokens == {ord("z"), ord("q")}  # the space is shared with the retain answers
    summary = side_effect_summary([0.5, 0.2], [0.1, 0.2], len(tokens), "text")
    assert summary["mean_change"] == pytest.approx(-0.2) and summary["occurrences"] == 2
    assert sum(summary["change_histogram"]["counts"]) == 2
    assert side_effect_summary([], [], 2, "text")["occurrences"] == 0


# -- data ------------------------------------------------------------------------------------------

def _eval_cfg(**kw):
    return OmegaConf.structured(EvalConfig(**kw))


def test_retain_short_uses_exactly_the_400_fixed_indices(tofu_dir):
    data = load_eval_data(_eval_cfg(), OmegaConf.structured(DataConfig(tofu_dir=str(tofu_dir))), "forget10")
    indices = json.loads((tofu_dir / "retain_short_indices.json").read_text())["indices"]
    retain = [json.loads(line) for line in (tofu_dir / "retain90.json").read_text().splitlines()]
    split = data.splits["retain_short"]
    assert len(indices) == 400 and len(set(indices)) < 400  # drawn with replacement: duplicates kept
    assert split.indices == indices and len(split.questions) == 400
    assert split.questions == [retain[i]["question"] for i in indices]
    assert split.answers == [retain[i]["answer"] for i in indices]
    assert len(data.splits["forget"].questions) == 400 and len(data.splits["world_facts"].questions) == 117
    assert data.splits["forget_paraphrased"].question_field == "paraphrased_question"
    assert len(data.splits["real_authors"].questions) == 100
    assert len(data.multiple_choice) == 400 and {len(i.wrong_answers) for i in data.multiple_choice} == {5}


def test_demo_data_evaluates_the_splits_it_has(demo_data_dir):
    cfg = _eval_cfg(retain_split_for_eval="retain")
    data = load_eval_data(cfg, OmegaConf.structured(DataConfig(tofu_dir=str(demo_data_dir))), "forget")
    assert data.splits["world_facts"] is None and data.splits["real_authors"] is None
    assert data.splits["retain_short"].indices is None and data.multiple_choice is None
    assert "perturbed_answer" in data.notes["mc_leakage"] and "not found" in data.notes["world_facts"]


def test_a_split_missing_a_needed_field_is_a_clear_error(tmp_path):
    (tmp_path / "forget.json").write_text(json.dumps({"question": "q"}) + "\n")
    (tmp_path / "forget_perturbed.json").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    data_cfg = OmegaConf.structured(DataConfig(tofu_dir=str(tmp_path)))
    with pytest.raises(DataError, match="'answer'"):
        load_eval_data(_eval_cfg(), data_cfg, "forget")
    (tmp_path / "forget.json").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match="forget_perturbed.*'paraphrased_question'"):
        load_eval_data(_eval_cfg(), data_cfg, "forget")


# -- pmc evaluate: targets and bad input -----------------------------------------------------------

def test_a_run_dir_resolves_to_its_final_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-final").mkdir(parents=True)
    (run / "checkpoint-final" / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    found = resolve_target(str(run))
    assert found.checkpoint == run / "checkpoint-final" and found.run_dir == run
    assert resolve_target(str(run / "checkpoint-final")).run_dir is None
    (run / "checkpoint-final" / "config.json").unlink()
    with pytest.raises(PMCError, match="no checkpoint-final"):
        resolve_target(str(run))


def test_check_evaluate_reports_missing_fields_before_any_engine(tmp_path, tiny_model_dir):
    (tmp_path / "forget.json").write_text(json.dumps({"question": "q"}) + "\n")
    cfg = from_mapping("evaluate", {"target": str(tiny_model_dir), "model": {"path": str(tiny_model_dir)},
                                    "data": {"tofu_dir": str(tmp_path), "forget": "forget"},
                                    "rollout": {"max_model_len": 512}, "output_dir": str(tmp_path / "out")})
    with pytest.raises(DataError, match="'answer'"):
        check_evaluate(cfg)
    assert not (tmp_path / "out").exists()


def test_eval_keys_are_the_documented_ones():
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    sentence = re.search(r"`eval.json` \(top-level keys (.*?)\),", docs, flags=re.S).group(1)
    assert tuple(re.findall(r"`(\w+)`", sentence)) == EVAL_KEYS
    table_keys = {key for row in docs.splitlines() if row.startswith("| `")
                  for key in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert set(EVAL_KEYS) <= table_keys  # every key has a row saying what it holds


class LengthModel(FakeModel):
    """Greedy answers of 30 characters; records the max_tokens it was asked for."""

    def __init__(self):
        super().__init__(lambda question, text, index: "x" * 30)
        self.max_tokens: list[int] = []

    def greedy(self, prompt_ids, max_tokens):
        self.max_tokens.append(max_tokens)
        return [self._complete(ids, 0) for ids in prompt_ids]


def test_max_length_limits_prompt_and_answer_together_not_new_tokens():
    """evaluation.max_length (the reference's max_length 200): a longer prompt leaves fewer answer tokens;
    max_tokens alone gives every question the same number of new tokens."""
    from pmc_pipeline.eval.metrics import greedy_answers

    questions = ["Q1?", "A much longer question?"]
    prompt_lengths = [len(PROMPT.format(q)) for q in questions]
    model = LengthModel()
    answers = greedy_answers(model, CharFormatter(), questions, 12, max_length=30)
    assert [len(a) for a in answers] == [30 - n for n in prompt_lengths]  # not 12, not 30 each
    assert model.max_tokens == [30 - min(prompt_lengths)]  # one call, the longest allowance
    assert [len(a) for a in greedy_answers(model, CharFormatter(), questions, 12)] == [30, 30]  # the fake ignores it
    assert model.max_tokens[-1] == 12


def test_the_paper_preset_sets_the_reference_evaluation_and_later_overrides_win(tiny_model_dir):
    from pmc_pipeline.errors import ConfigError
    from pmc_pipeline.recipes.evaluate import load_evaluate_config

    cfg = load_evaluate_config(str(tiny_model_dir), ["preset=paper"])
    assert (cfg.evaluation.max_length, cfg.model.plain_prompt, cfg.model.dtype) == (200, "reference", "bfloat16")
    cfg = load_evaluate_config(str(tiny_model_dir), ["preset=paper", "model.dtype=float32"])
    assert (cfg.evaluation.max_length, cfg.model.dtype) == (200, "float32")
    assert load_evaluate_config(str(tiny_model_dir), []).evaluation.max_length is None
    with pytest.raises(ConfigError, match="preset=openunlearning: no such preset; choose one of: paper"):
        load_evaluate_config(str(tiny_model_dir), ["preset=openunlearning"])
