"""The reward equals rouge-score's ROUGE-L recall; penalty and selection behave as the method says."""

import math
import random

import numpy as np
import pytest
from rouge_score.rouge_scorer import RougeScorer

from pmc_pipeline.method.rewards import score
from pmc_pipeline.method.rewards.rouge_l import rouge_l_recall, rouge_l_reward, short_answer_penalty
from pmc_pipeline.method.selection import select_argmax

SCORER = RougeScorer(["rougeL"], use_stemmer=True)

HAND_MADE = [
    ("The cat sat on the mat.", "the cat sat on the mat"),
    ("The cat sat on the mat.", "A dog stood."),
    ("Basil Mahfouz Al-Kuwaiti was born in 1932!", "born 1932, Kuwait City"),
    ("Running runners ran quickly", "run runner running quick"),  # stemming
    ("Numbers: 3.14159 and 42", "42 then 3 14159"),
    ("Café crème à Zürich, naïve façade", "cafe creme a zurich naive facade"),  # non-ASCII
    ("日本語のテキスト", "日本語"),  # no [a-z0-9] tokens at all -> 0
    ("", "anything"),
    ("anything", ""),
    ("", ""),
    ("...!!!", "?"),
    ("Hello hello HELLO", "hello"),
]


def _random_text(rng: random.Random) -> str:
    words = ["the", "author", "was", "born", "in", "1932", "Kuwait", "city", "writing", "writes", "novels",
             "Zürich", "café", "prize", "awards", "awarded", "!", ",", "3.5", "non-fiction", "his", "her", ""]
    return " ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))


def test_rouge_l_recall_matches_rouge_score_on_hand_made_pairs():
    refs, cands = zip(*HAND_MADE)
    expected = [SCORER.score(r, c)["rougeL"].recall for r, c in HAND_MADE]
    assert rouge_l_recall(refs, cands).tolist() == pytest.approx(expected, abs=1e-12)


def test_rouge_l_recall_matches_rouge_score_on_many_random_pairs():
    rng = random.Random(0)
    pairs = [(_random_text(rng), _random_text(rng)) for _ in range(2000)]
    expected = np.array([SCORER.score(r, c)["rougeL"].recall for r, c in pairs])
    got = rouge_l_recall([r for r, _ in pairs], [c for _, c in pairs])
    assert np.abs(got - expected).max() < 1e-12
    assert (expected > 0).sum() > 500 and (expected == 0).sum() > 10  # the sample covers both cases


def test_rouge_l_recall_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one reference per candidate"):
        rouge_l_recall(["a", "b"], ["a"])


def test_short_answer_penalty_follows_word_count():
    texts = ["", "one", "one two", "one two three", "one two three four five"]
    penalty = short_answer_penalty(texts, min_len=3)
    assert penalty.tolist() == pytest.approx([1.0, math.exp(-1), math.exp(-2), 0.0, 0.0])
    assert short_answer_penalty(texts, min_len=0).tolist() == [0.0] * 5


def test_reward_is_one_minus_capped_recall_plus_penalty():
    reference = ["Jane was born in Paris in 1950"]
    samples = [["Jane was born in Paris in 1950", "I do not know that person at all", "Paris", ""]]
    rewards = score(rouge_l_reward, reference, samples, min_len=3)
    recall_paris = SCORER.score(reference[0], "Paris")["rougeL"].recall
    expected = [0.0, 1.0, 1.0 - min(1.0, recall_paris + math.exp(-1)), 0.0]
    assert rewards.shape == (1, 4)
    assert rewards[0].tolist() == pytest.approx(expected)
    # without the penalty the empty answer would be the best possible answer
    assert score(rouge_l_reward, reference, samples, min_len=0)[0, 3] == 1.0


def test_argmax_selection_breaks_ties_towards_the_first_sample():
    rewards = np.array([[0.2, 0.9, 0.9, 0.1], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.3, 0.3]])
    chosen = select_argmax(rewards)
    assert chosen.index.tolist() == [1, 0, 2]
    assert chosen.reward.tolist() == pytest.approx([0.9, 0.5, 0.3])
    assert chosen.degenerate.tolist() == [False, False, False]


def test_selection_flags_questions_whose_samples_all_score_zero():
    chosen = select_argmax(np.array([[0.0, 0.0, 0.0], [0.0, 0.4, 0.0]]))
    assert chosen.degenerate.tolist() == [True, False]
