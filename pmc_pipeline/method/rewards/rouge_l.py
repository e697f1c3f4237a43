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
from functools import lru_cache
from typing import Sequence

import numpy as np
from nltk.stem.porter import PorterStemmer
from rapidfuzz.distance import LCSseq

# rouge_score.tokenize's rules: lowercase, every run of characters outside [a-z0-9] is a separator,
# words longer than 3 characters are Porter-stemmed (the stemmer rouge-score builds), and only
# tokens matching [a-z0-9]+ are kept.
from pmc_pipeline.method.rewards.common import check_shape

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


def rouge_l_reward(references: Sequence[str], samples: Sequence[Sequence[str]]) -> np.ndarray:
    """1 - ROUGE-L recall(reference, sample), per sample."""
    n = check_shape(references, samples)
    flat = [text for row in samples for text in row]
    recall = rouge_l_recall([ref for ref in references for _ in range(n)], flat)
    return 1.0 - np.minimum(recall, 1.0).reshape(len(samples), n)
