"""What a loss over answer log-probs reads: per-token answer log-probs of a batch of sequences, as the trainer computes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class AnswerScores:
    """Rows are sequences; `token_logprobs[i, t]` = log p(answer token t of row i | what precedes it) under
    the model being trained, 0 where `mask` is False (prompt and padding). The end-of-answer marker is an
    answer token. `reference_sums`: the same rows' summed log-probs under the frozen starting model
    (computed once before training), for the methods that compare with it; `token_kl`: per-token KL from
    the starting model's next-token distribution, for a KL retain term."""

    token_logprobs: torch.Tensor  # [rows, tokens]
    mask: torch.Tensor  # [rows, tokens] bool
    reference_sums: torch.Tensor | None = None  # [rows]
    token_kl: torch.Tensor | None = None  # [rows, tokens]: KL(starting model || model) of each next-token distribution

    def __post_init__(self) -> None:
        if self.token_logprobs.shape != self.mask.shape:
            raise ValueError(f"token_logprobs {tuple(self.token_logprobs.shape)} and mask {tuple(self.mask.shape)} "
                             "must have one shape")
        if self.token_kl is not None and self.token_kl.shape != self.mask.shape:
            raise ValueError(f"token_kl {tuple(self.token_kl.shape)}: one value per token expected")
        if self.reference_sums is not None and self.reference_sums.shape != self.token_logprobs.shape[:1]:
            raise ValueError(f"reference_sums {tuple(self.reference_sums.shape)}: one value per row expected")

    @property
    def sums(self) -> torch.Tensor:
        """S(y): each row's summed answer-token log-prob."""
        return (self.token_logprobs * self.mask).sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        """|y|: each row's number of answer tokens."""
        return self.mask.sum(-1)

    def mean_nll(self) -> torch.Tensor:
        """NLL: the negative log-prob averaged over every answer token of the batch (HF's `outputs.loss`)."""
        return -self.token_logprobs[self.mask].mean()

    def mean_kl(self) -> torch.Tensor:
        """The KL from the starting model averaged over every answer token of the batch (`retain_loss: kl`)."""
        if self.token_kl is None:
            raise ValueError("mean_kl: token_kl is missing (the job's kl_roles do not include these rows' role)")
        return self.token_kl[self.mask].mean()

    def require_reference(self, method: str) -> torch.Tensor:
        if self.reference_sums is None:
            raise ValueError(f"{method} compares with the starting model: reference_sums are missing")
        return self.reference_sums


# A loss over each role's rows ("forget", "retain", ...): the trainer computes the scores, a method the loss
Objective = Callable[[dict[str, AnswerScores]], torch.Tensor]
