"""DPO toward refusals (IdkDPO): for each forget question, a refusal line is preferred to the true answer.

    loss = -(2 / beta) * mean_i logsigmoid(beta * [(S(w_i) - S_ref(w_i)) - (S(l_i) - S_ref(l_i))])

winner w_i = the refusal, loser l_i = the true answer, row i of each; the 2 / beta prefactor is
OpenUnlearning's (standard DPO has none: it rescales the learning rate, which the paper's grid
searches anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.scores import AnswerScores


def dpo_forget_loss(refusals: AnswerScores, forget: AnswerScores, beta: float) -> torch.Tensor:
    if refusals.sums.shape != forget.sums.shape:
        raise ValueError(f"DPO pairs row by row: {refusals.sums.numel()} refusals for {forget.sums.numel()} answers")
    winner = refusals.sums - refusals.require_reference("DPO")
    loser = forget.sums - forget.require_reference("DPO")
    return -(2.0 / beta) * F.logsigmoid(beta * (winner - loser)).mean()
