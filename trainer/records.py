"""What the trainer consumes: token sequences whose loss covers the answer tokens only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainExample:
    """prompt + answer tokens; positions before `answer_start` carry no loss.

    `role` groups examples in the loss: loss = sum over roles of weight[role] * mean answer-token NLL
    of that role's examples in the batch (roles: "sft", "retain", "forget", "align").
    """

    input_ids: tuple[int, ...]
    answer_start: int
    role: str
    # the answer's summed log-prob under the frozen starting model, for losses that compare with it (NPO, DPO)
    reference_logprob: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.answer_start < len(self.input_ids):
            raise ValueError(
                f"answer_start={self.answer_start} must leave at least one prompt and one answer token "
                f"(sequence of {len(self.input_ids)} tokens)"
            )


def merge_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Answer-token-weighted means across ranks (or an epoch's chunks); token counts summed; steps and lr
    from the first."""
    tokens = sum(m["answer_tokens"] for m in per_rank)
    role_tokens: dict[str, int] = {}
    role_sums: dict[str, float] = {}
    for metrics in per_rank:
        for role, n in metrics["role_tokens"].items():
            role_tokens[role] = role_tokens.get(role, 0) + n
            role_sums[role] = role_sums.get(role, 0.0) + metrics["role_loss"][role] * n
    return {
        "loss": sum(m["loss"] * m["answer_tokens"] for m in per_rank) / tokens if tokens else 0.0,
        "role_loss": {role: role_sums[role] / role_tokens[role] for role in role_sums},
        "role_tokens": role_tokens,
        "answer_tokens": tokens,
        "micro_steps": per_rank[0]["micro_steps"],
        "optimizer_steps": per_rank[0]["optimizer_steps"],
        "lr": per_rank[0]["lr"],
    }
