"""NPO, negative preference optimisation (Zhang et al. 2024): the forget answers as the loser of a
preference with no winner, relative to the starting model.

    loss = (2 / beta) * mean_i log(1 + exp(beta * (S(y_i) - S_ref(y_i))))

over sequence sums (no length normalisation); at the start S = S_ref and the loss is (2 / beta) log 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.scores import AnswerScores


def npo_forget_loss(forget: AnswerScores, beta: float) -> torch.Tensor:
    log_ratio = forget.sums - forget.require_reference("NPO")
    return (2.0 / beta) * F.softplus(beta * log_ratio).mean()  # softplus(x) = log(1 + e^x), stable
