"""Reward plug-ins: values on hand-made cases, the penalty composing with each, user rewards by dotted path."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu as nltk_sentence_bleu

from pmc_pipeline.config import load_config
from pmc_pipeline.errors import ConfigError
from pmc_pipeline.method.alignment import load_refusals
from pmc_pipeline.method.rewards import REWARDS, register_reward, resolve_reward, score
from pmc_pipeline.method.rewards.rouge_l import rouge_l_recall, rouge_l_reward, short_answer_penalty
from pmc_pipeline.method.rewards.self_bleu import self_bleu_reward, sentence_bleu
from pmc_pipeline.method.rewards.semantic import semantic_reward

REFERENCE = "Mara Quill was born in Lisbon in 1961."
SAMPLES = ["Mara Quill was born in Lisbon in 1961.", "Mara was born in Oslo.", "Blue kettles sing loudly", ""]


def test_rouge_l_reward_is_one_minus_recall_and_with_the_penalty_the_papers_reward():
    rewards = rouge_l_reward([REFERENCE], [SAMPLES])[0]
    assert rewards[0] == 0.0 and rewards[2] == 1.0 and rewards[3] == 1.0
    assert rewards[1] == pytest.approx(1 - 4 / 8)  # LCS "mara was born in": 4 of 8 tokens
    recall = rouge_l_recall([REFERENCE] * len(SAMPLES), SAMPLES)
    for min_len in (0, 3, 5):  # the paper: 1 - min(1, recall + penalty)
        expected = 1.0 - np.minimum(1.0, recall + short_answer_penalty(SAMPLES, min_len))
        assert np.allclose(score(rouge_l_reward, [REFERENCE], [SAMPLES], min_len)[0], expected, atol=1e-12)


def test_self_bleu_rewards_samples_unlike_the_others():
    same = ["the cat sat on the mat"] * 3
    assert np.allclose(self_bleu_reward(["ref"], [same]), 0.0)
    disjoint = ["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]
    assert np.allclose(self_bleu_reward(["ref"], [disjoint]), 1.0)
    mixed = self_bleu_reward(["ref"], [["the cat sat on the mat", "the cat sat on a rug", "quantum foam"]])[0]
    assert 0 < mixed[0] < 1 and 0 < mixed[1] < 1 and mixed[2] == 1.0
    assert self_bleu_reward(["ref"], [["lonely sample"]])[0, 0] == 1.0  # nothing to compare with


@pytest.mark.parametrize("hypothesis,references", [
    ("the cat sat on the mat today", ["the cat sat on the mat", "a dog lay on a rug"]),
    ("a b c d e f g", ["a b c x e f g h i"]),
    ("short one", ["a much longer reference sentence here", "short one indeed"]),
])
def test_sentence_bleu_matches_nltk(hypothesis, references):
    ours = sentence_bleu(hypothesis.split(), [r.split() for r in references])
    theirs = nltk_sentence_bleu([r.split() for r in references], hypothesis.split(),
                                smoothing_function=SmoothingFunction().method2)
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_semantic_reward_prefers_meaning_far_from_the_reference():
    samples = ["Mara Quill was born in the city of Lisbon in 1961.", "I don't know anything about that person.",
               "Photosynthesis converts sunlight into chemical energy.", ""]
    rewards = semantic_reward([REFERENCE], [samples])[0]
    assert rewards[0] < 0.15  # a paraphrase of the reference
    assert rewards[1] > 0.6 and rewards[2] > 0.6
    assert rewards[3] == 0.0
    refusals = load_refusals()
    with_bonus = semantic_reward([REFERENCE], [samples], refusals=refusals, refusal_weight=0.5)[0]
    assert with_bonus[1] > with_bonus[2]  # the refusal now beats the unrelated fact
    assert rewards[1] - rewards[2] < with_bonus[1] - with_bonus[2]


def test_the_short_answer_penalty_composes_with_any_reward():
    def always_one(references, samples):
        return np.ones((len(samples), len(samples[0])))

    rewards = score(always_one, ["r"], [["one", "two words", "now three words", ""]], min_len=3)[0]
    assert rewards == pytest.approx([1 - math.exp(-1), 1 - math.exp(-2), 1.0, 0.0])
    assert np.allclose(score(always_one, ["r"], [["one", ""]], min_len=0), 1.0)


def _write_user_reward(tmp_path, monkeypatch) -> str:
    module = tmp_path / "my_rewards_pkg.py"
    module.write_text(
        "import numpy as np\n"
        "def longer_is_better(references, samples):\n"
        "    return np.array([[min(1.0, len(s) / 20) for s in row] for row in samples])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_pkg.longer_is_better"


def test_a_user_reward_loads_by_dotted_path(tmp_path, monkeypatch):
    path = _write_user_reward(tmp_path, monkeypatch)
    for name in (path, path.replace(".longer", ":longer")):
        fn = resolve_reward(name)
        assert np.allclose(score(fn, ["r"], [["a" * 5, "b" * 40]], min_len=0), [[0.25, 1.0]])
    cfg = load_config("unlearn", "unlearn/phi-1.5", [f"pmc.reward={path}"])
    assert resolve_reward(cfg.pmc.reward).__name__ == "longer_is_better"


def test_registered_rewards_are_selectable(monkeypatch):
    monkeypatch.setitem(REWARDS, "constant", None)
    register_reward("constant", lambda references, samples: np.full((len(samples), len(samples[0])), 0.5))
    assert np.allclose(score(resolve_reward("constant"), ["r"], [["x y z"]], 0), 0.5)


@pytest.mark.parametrize("name,message", [
    ("bleu", "pmc.reward='bleu' is not a known reward"),
    ("no_such_module_xyz.fn", "cannot load"),
    ("numpy.no_such_function", "cannot load"),
    ("math.pi", "not a callable"),
])
def test_bad_rewards_fail_with_one_line_naming_the_key(name, message):
    with pytest.raises(ConfigError) as info:
        resolve_reward(name)
    assert message in str(info.value) and "pmc.reward" in str(info.value)


def test_config_rejects_an_unknown_reward_name_before_anything_runs():
    with pytest.raises(ConfigError, match="pmc.reward='bleu' is not allowed"):
        load_config("unlearn", "unlearn/phi-1.5", ["pmc.reward=bleu"])


def test_a_reward_of_the_wrong_shape_or_with_nan_is_refused():
    with pytest.raises(ValueError, match="shape"):
        score(lambda refs, samples: np.ones(3), ["r"], [["a", "b"]], 0)
    with pytest.raises(ValueError, match="NaN"):
        score(lambda refs, samples: np.full((1, 2), np.nan), ["r"], [["a", "b"]], 0)


def test_refusal_file_errors_name_the_key(tmp_path):
    assert len(load_refusals()) == 20
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="pmc.refusals_file"):
        load_refusals(empty)
    with pytest.raises(ConfigError, match="pmc.refusals_file"):
        load_refusals(tmp_path / "missing.txt")
