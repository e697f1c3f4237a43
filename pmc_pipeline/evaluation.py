"""Greedy TOFU-style metrics on a live rollout engine.

Definitions (paper Section 5, as in the reference code):
    R_split           mean ROUGE-L recall of the greedy answer against the split's ground-truth answer
    unlearn quality   UQ = 100 * (2 - R_forget - R_forget_paraphrased) / 2
    utility           U  = 100 * mean(R_retain_short, R_world_facts, R_real_authors)   (the splits available)
Fact leakage (demo data only): share of answers that still contain their key fact (case-insensitive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pmc_pipeline.prompts import PromptFormatter
from pmc_pipeline.reward import rouge_l_recall


@dataclass(frozen=True)
class SplitResult:
    recall: float
    answers: list[str]
    recalls: list[float]


def greedy_answers(rollout: Any, formatter: PromptFormatter, questions: Sequence[str], max_tokens: int) -> list[str]:
    completions = rollout.greedy([formatter.prompt_ids(q) for q in questions], max_tokens)
    return [formatter.decode(c.token_ids) for c in completions]


def score_split(rollout: Any, formatter: PromptFormatter, questions: Sequence[str], answers: Sequence[str],
                max_tokens: int) -> SplitResult:
    generated = greedy_answers(rollout, formatter, questions, max_tokens)
    recalls = rouge_l_recall(list(answers), generated)
    return SplitResult(recall=float(np.mean(recalls)) if len(recalls) else 0.0, answers=generated,
                       recalls=[float(r) for r in recalls])


def fact_leakage(answers: Sequence[str], key_facts: Sequence[str]) -> float:
    """Share of answers that still state their key fact."""
    if not answers:
        return 0.0
    hits = [fact.lower() in answer.lower() for answer, fact in zip(answers, key_facts)]
    return float(np.mean(hits))


def unlearn_quality(r_forget: float, r_paraphrased: float) -> float:
    return 100.0 * (2.0 - r_forget - r_paraphrased) / 2.0


def utility(utility_recalls: Sequence[float]) -> float:
    return 100.0 * float(np.mean(utility_recalls))
