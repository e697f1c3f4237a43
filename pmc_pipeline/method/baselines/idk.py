"""IDK: supervised fine-tuning on refusals, each forget question's answer replaced by a refusal line.

    loss = NLL(refusals)  (+ lambda * NLL(retain), separate token means, as PMC's loss; TOFU's
    original concatenates the two batches into one token mean)
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from trainer.scores import AnswerScores


def idk_targets(questions: Sequence[str], refusals: Sequence[str], rng: random.Random) -> list[tuple[str, str]]:
    """(question, refusal) training pairs: one refusal line drawn per question; the true answer never appears."""
    if not refusals:
        raise ValueError("IDK needs at least one refusal line")
    return [(question, rng.choice(list(refusals))) for question in questions]


def idk_forget_loss(refusals: AnswerScores) -> torch.Tensor:
    return refusals.mean_nll()
