"""What every reward shares: the matrix shape check and the top of the reward scale."""

from __future__ import annotations

from typing import Sequence

MAX_REWARD = 1.0


def check_shape(references: Sequence[str], samples: Sequence[Sequence[str]]) -> int:
    """The number of samples per question, after checking there is one reference per question and the
    same number of samples for each."""
    if len(references) != len(samples):
        raise ValueError(f"need one reference per question: {len(references)} references, "
                         f"{len(samples)} questions")
    n = len(samples[0]) if samples else 0
    if any(len(row) != n for row in samples):
        raise ValueError("every question needs the same number of samples")
    return n
