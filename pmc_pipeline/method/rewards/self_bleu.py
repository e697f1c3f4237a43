"""`self_bleu`: 1 - self-BLEU of a sample against the other n - 1 samples of its question (the
paper's Appendix A.7): samples unlike each other win, whatever the reference said."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from pmc_pipeline.method.rewards.common import check_shape


def _ngrams(tokens: Sequence[str], order: int) -> Counter:
    return Counter(tuple(tokens[i:i + order]) for i in range(len(tokens) - order + 1))


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4) -> float:
    """BLEU of one tokenised hypothesis against several references.

    Clipped n-gram precisions up to `max_order` (add-one smoothing for orders above 1, so short
    sentences do not all score 0), geometric mean, brevity penalty against the closest reference length.
    """
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for order in range(1, max_order + 1):
        counts = _ngrams(hypothesis, order)
        max_ref: Counter = Counter()
        for ref in references:
            max_ref |= _ngrams(ref, order)
        matches = sum(min(c, max_ref[g]) for g, c in counts.items())
        total = max(len(hypothesis) - order + 1, 1)  # as nltk: a too-short hypothesis counts 0 of 1
        if order == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total)
        else:
            log_precision += math.log((matches + 1) / (total + 1))
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_precision / max_order)


def self_bleu_reward(references: Sequence[str], samples: Sequence[Sequence[str]]) -> np.ndarray:
    """1 - BLEU of each sample against its question's other samples (a lone sample scores 1)."""
    n = check_shape(references, samples)
    rewards = np.ones((len(samples), n))
    for q, row in enumerate(samples):
        tokens = [text.lower().split() for text in row]
        for i in range(n):
            others = [t for j, t in enumerate(tokens) if j != i and t]
            if others:
                rewards[q, i] = 1.0 - min(1.0, sentence_bleu(tokens[i], others))
    return rewards
