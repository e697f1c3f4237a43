"""Property test: the project's ROUGE-L recall equals rouge-score's on random text (seeded), including
punctuation, digits, non-ASCII (letters whose lowercase is ASCII too), stemmable words and empty strings."""

from __future__ import annotations

import random

import numpy as np
from rouge_score.rouge_scorer import RougeScorer

from pmc_pipeline.method.rewards.rouge_l import rouge_l_recall

WORDS = ["the", "a", "author", "authors", "authored", "running", "runs", "ran", "generously", "happiness",
         "relational", "1932", "3.14", "42nd", "x", "is", "was", "born", "Kuwait", "CITY", "caresses", "ponies"]
PIECES = [".", ",", "!", "?", "-", "'", "\"", "(", ")", ":", ";", "/", "\n", "\t", "  ", "—", "…"]
NON_ASCII = ["Zürich", "café", "naïve", "façade", "straße", "日本語", "Ελλάδα", "Москва", "\u212a", "\u0130stanbul",
             "ﬁnal", "😀", "Ａ", "①", "é"]  # U+212A Kelvin sign lowercases to ASCII "k"; U+0130 to "i̇"


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 30)):
        kind = rng.random()
        if kind < 0.6:
            parts.append(rng.choice(WORDS))
        elif kind < 0.75:
            parts.append(rng.choice(NON_ASCII))
        elif kind < 0.9:
            parts.append(rng.choice(PIECES))
        else:
            parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789ÄÖÜäöü") for _ in range(rng.randint(1, 9))))
    joiner = rng.choice([" ", "", " ", "-"])
    return joiner.join(parts)


def test_equal_to_rouge_score_on_random_text():
    rng = random.Random(12345)
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [(random_text(rng), random_text(rng)) for _ in range(3000)]
    pairs += [("", random_text(rng)), (random_text(rng), ""), ("", ""), ("\u212a", "k"), ("İ", "i")]
    expected = np.array([scorer.score(r, c)["rougeL"].recall for r, c in pairs])
    got = rouge_l_recall([r for r, _ in pairs], [c for _, c in pairs])
    assert np.array_equal(got, expected)  # exactly: both are LCS / reference length as a float
    assert (expected > 0).sum() > 1000 and (expected == 0).sum() > 50  # both cases really occur
    assert 0 < expected[(expected > 0) & (expected < 1)].size  # and partial matches


def test_one_reference_shared_by_many_samples_matches_too():
    """The PMC shape: each reference scored against n samples (the cached path)."""
    rng = random.Random(7)
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    references = [random_text(rng) for _ in range(20)]
    samples = [[random_text(rng) for _ in range(25)] for _ in references]
    flat_refs = [r for r, row in zip(references, samples) for _ in row]
    flat = [s for row in samples for s in row]
    expected = np.array([scorer.score(r, c)["rougeL"].recall for r, c in zip(flat_refs, flat)])
    assert np.array_equal(rouge_l_recall(flat_refs, flat), expected)
