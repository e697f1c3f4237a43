"""PMC-fast: the best answer per forget question, kept across epochs.

A new pick replaces the cached answer only if its reward is at least as good; a question whose best
reward reached the maximum is not sampled again; training uses the cached answers. Zero-reward picks
(the model still says the reference) are never cached: training on them would re-teach the secret.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# rewards within this of the maximum count as converged (floating-point noise in 1 - recall)
CONVERGED_TOLERANCE = 1e-9


class BestAnswerCache:
    def __init__(self, num_questions: int, max_reward: float = 1.0):
        self.max_reward = max_reward
        self.answers: list[str | None] = [None] * num_questions
        self.rewards = np.full(num_questions, -np.inf)

    def update(self, questions: Sequence[int], answers: Sequence[str], rewards: Sequence[float]) -> int:
        """Offer this epoch's picks for the given question indices; returns how many replaced the cache."""
        replaced = 0
        for q, answer, reward in zip(questions, answers, rewards):
            if reward > 0.0 and reward >= self.rewards[q]:
                self.answers[q], self.rewards[q] = answer, float(reward)
                replaced += 1
        return replaced

    def to_sample(self) -> list[int]:
        """Questions still worth sampling: best reward below the maximum (or nothing cached)."""
        return [int(q) for q in np.flatnonzero(self.rewards < self.max_reward - CONVERGED_TOLERANCE)]

    def cached(self) -> list[int]:
        return [q for q, answer in enumerate(self.answers) if answer is not None]

    def converged(self) -> int:
        return len(self.answers) - len(self.to_sample())

    def clear(self) -> None:
        """Forget everything (after a restart the old rewards are measured against stale references)."""
        self.answers = [None] * len(self.answers)
        self.rewards[:] = -np.inf
