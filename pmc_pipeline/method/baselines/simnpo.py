"""SimNPO (Fan et al. 2024): NPO without a reference model, on length-normalised log-probs, with a margin.

    loss = -(2 / beta) * mean_i logsigmoid(-beta * S(y_i) / |y_i| - delta)

`delta` (the paper's gamma) sits outside beta as in the SimNPO paper; OpenUnlearning's code writes
logsigmoid(beta * (NLL_i - delta)), i.e. beta * delta: the same at the PMC paper's delta 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.scores import AnswerScores


def simnpo_forget_loss(forget: AnswerScores, beta: float, delta: float) -> torch.Tensor:
    normalised = forget.sums / forget.lengths.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * normalised - delta).mean()
