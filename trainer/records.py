"""What the trainer consumes: token sequences whose loss covers the answer tokens only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainExample:
    """prompt + answer tokens; positions before `answer_start` carry no loss.

    `role` groups examples in the loss: loss = sum over roles of weight[role] * mean answer-token NLL
    of that role's examples in the batch (roles: "sft", "retain", "forget", "align").
    """

    input_ids: tuple[int, ...]
    answer_start: int
    role: str

    def __post_init__(self) -> None:
        if not 0 < self.answer_start < len(self.input_ids):
            raise ValueError(
                f"answer_start={self.answer_start} must leave at least one prompt and one answer token "
                f"(sequence of {len(self.input_ids)} tokens)"
            )
