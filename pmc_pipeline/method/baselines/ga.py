"""GA, gradient ascent: raise the NLL of the forget answers (minimise -NLL). No retain term by default."""

from __future__ import annotations

import torch

from trainer.scores import AnswerScores


def ga_forget_loss(forget: AnswerScores) -> torch.Tensor:
    """-NLL(y_forget), token mean over the batch's forget answers."""
    return -forget.mean_nll()
