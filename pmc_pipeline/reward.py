"""Rewards and winner selection: plain functions over lists and arrays.

The PMC reward prefers answers unlike the ORIGINAL model's greedy answer:
    r(x) = 1 - min(1, ROUGE-L recall(reference=y, prediction=x) + short_penalty(x))
where short_penalty(x) = exp(-words(x)) when x has fewer than `min_len` words (0 disables it).
Without the penalty some models collapse to empty answers, which trivially score zero recall.

ROUGE-L follows the `rouge-score` package exactly (its tokenisation rules with the Porter stemmer,
recall = LCS / reference tokens, 0 when either side is empty). Stemming is the expensive part, so
it is done once per distinct word (a vocabulary is far smaller than the token count), texts are
tokenised once each (the n samples share one reference), and the LCS runs in rapidfuzz's C code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from nltk.stem.porter import PorterStemmer
from rapidfuzz.distance import LCSseq

# rouge_score.tokenize's rules: lowercase, every run of characters outside [a-z0-9] is a separator,
# words longer than 3 characters are Porter-stemmed (the stemmer rouge-score builds), and only
# tokens matching [a-z0-9]+ are kept.
_SEPARATORS = re.compile(r"[^a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")
_STEMMER = PorterStemmer()
# Token strings -> small ints, so rapidfuzz compares integer sequences (fast, exact).
_TOKEN_IDS: dict[str, int] = {}


@lru_cache(maxsize=500_000)
def _word_token_id(word: str) -> int | None:
    """The id of one word's stemmed token; None when rouge-score would drop the token."""
    token = _STEMMER.stem(word) if len(word) > 3 else word
    if not _VALID_TOKEN.match(token):
        return None
    return _TOKEN_IDS.setdefault(token, len(_TOKEN_IDS))


@lru_cache(maxsize=200_000)
def _token_ids(text: str) -> tuple[int, ...]:
    ids = map(_word_token_id, _SEPARATORS.sub(" ", text.lower()).split())
    return tuple(token_id for token_id in ids if token_id is not None)


def clear_caches(words: bool = True) -> None:
    """Forget tokenised texts (and, with `words`, stemmed words): a cold start for benchmarks."""
    _token_ids.cache_clear()
    if words:
        _word_token_id.cache_clear()


def rouge_l_recall(references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
    """ROUGE-L recall of each candidate against its reference (rouge-score semantics, stemmer on)."""
    if len(references) != len(candidates):
        raise ValueError(
            f"rouge_l_recall needs one reference per candidate, got {len(references)} references "
            f"and {len(candidates)} candidates"
        )
    recalls = np.zeros(len(candidates), dtype=np.float64)
    for i, (reference, candidate) in enumerate(zip(references, candidates)):
        ref_ids, cand_ids = _token_ids(reference), _token_ids(candidate)
        if ref_ids and cand_ids:
            recalls[i] = LCSseq.similarity(ref_ids, cand_ids) / len(ref_ids)
    return recalls


def word_count(text: str) -> int:
    """Whitespace-separated words; the empty answer has 0 words (and so the full penalty)."""
    return len(text.split())


def short_answer_penalty(candidates: Sequence[str], min_len: int) -> np.ndarray:
    """exp(-words) for candidates shorter than `min_len` words, else 0; min_len 0 disables it."""
    penalty = np.zeros(len(candidates), dtype=np.float64)
    if min_len <= 0:
        return penalty
    for i, text in enumerate(candidates):
        words = word_count(text)
        if words < min_len:
            penalty[i] = math.exp(-words)
    return penalty


def rouge_divergence_reward(
    references: Sequence[str], samples: Sequence[Sequence[str]], min_len: int
) -> np.ndarray:
    """Reward matrix [questions, n] = 1 - min(1, ROUGE-L recall + short-answer penalty).

    references[i] is the original model's greedy answer to question i; samples[i] its n samples.
    """
    if len(references) != len(samples):
        raise ValueError(
            f"need one reference per question: {len(references)} references, {len(samples)} questions"
        )
    if not samples:
        return np.zeros((0, 0))
    n = len(samples[0])
    if any(len(row) != n for row in samples):
        raise ValueError("every question needs the same number of samples")
    flat_candidates = [text for row in samples for text in row]
    flat_references = [ref for ref in references for _ in range(n)]
    similarity = rouge_l_recall(flat_references, flat_candidates)
    similarity += short_answer_penalty(flat_candidates, min_len)
    return 1.0 - np.minimum(similarity, 1.0).reshape(len(samples), n)


@dataclass(frozen=True)
class Selection:
    """The winning sample per question and what the loop must know about it."""

    index: np.ndarray  # [questions] index of the chosen sample
    reward: np.ndarray  # [questions] its reward
    degenerate: np.ndarray  # [questions] bool: every sample scored 0 (the model still says the reference)


def select_argmax(rewards: np.ndarray) -> Selection:
    """Best sample per question; ties go to the sample drawn first (np.argmax's rule)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    index = np.argmax(rewards, axis=1) if rewards.size else np.zeros(len(rewards), dtype=int)
    chosen = rewards[np.arange(len(rewards)), index] if rewards.size else np.zeros(len(rewards))
    degenerate = np.all(rewards <= 0.0, axis=1) if rewards.size else np.zeros(len(rewards), bool)
    return Selection(index=index, reward=chosen, degenerate=degenerate)
