"""Winner selection: which of a question's n samples the model is trained on.

- `argmax` (the paper's experiments): the best sample, ties to the one drawn first.
- `bradley_terry` (the paper's theory): sample i with probability softmax(r / tau)_i, from a seeded
  generator, so a run is reproducible. tau = 0 is exactly argmax; as tau -> 0 the distribution
  concentrates on the best sample (spread evenly over exact ties).
Both flag a question whose samples all score 0 as degenerate (see select_argmax).
`below_best` tells which winners score below their question's best sample: never under argmax, so
a count above 0 (logged per epoch as `selected_below_best`) shows Bradley-Terry really picked them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SELECTIONS = ("argmax", "bradley_terry")



@dataclass(frozen=True)
class Selection:
    """The winning sample per question and what the loop must know about it."""

    index: np.ndarray  # [questions] index of the chosen sample
    reward: np.ndarray  # [questions] its reward
    degenerate: np.ndarray  # [questions] bool: every sample scored 0 (the model still says the reference)


def select_argmax(rewards: np.ndarray) -> Selection:
    """Best sample per question; ties go to the sample drawn first (np.argmax's rule)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    index = np.argmax(rewards, axis=1) if rewards.size else np.zeros(len(rewards), dtype=int)
    chosen = rewards[np.arange(len(rewards)), index] if rewards.size else np.zeros(len(rewards))
    degenerate = np.all(rewards <= 0.0, axis=1) if rewards.size else np.zeros(len(rewards), bool)
    return Selection(index=index, reward=chosen, degenerate=degenerate)


def bradley_terry_probabilities(rewards: np.ndarray, tau: float) -> np.ndarray:
    """Row-wise softmax(rewards / tau), computed stably (tau > 0)."""
    if tau <= 0:
        raise ValueError(f"Bradley-Terry temperature tau must be > 0, got {tau}")
    logits = np.asarray(rewards, dtype=np.float64) / tau
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def select_bradley_terry(rewards: np.ndarray, tau: float, rng: np.random.Generator) -> Selection:
    """One sample per question drawn from softmax(reward / tau); tau == 0 is argmax."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if tau == 0 or rewards.size == 0:
        return select_argmax(rewards)
    probs = bradley_terry_probabilities(rewards, tau)
    # inverse-CDF draw: one uniform per question, so the same generator state gives the same picks
    cumulative = np.cumsum(probs, axis=1)
    draws = rng.random(len(rewards))[:, None]
    index = np.minimum((cumulative < draws * cumulative[:, -1:]).sum(axis=1), rewards.shape[1] - 1)
    chosen = rewards[np.arange(len(rewards)), index]
    return Selection(index=index, reward=chosen, degenerate=np.all(rewards <= 0.0, axis=1))


def below_best(rewards: np.ndarray, chosen: Selection) -> np.ndarray:
    """Per question: True where the winner's reward is below the best reward among its samples."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.size == 0:
        return np.zeros(len(rewards), dtype=bool)
    return chosen.reward < rewards.max(axis=1)


def select(rewards: np.ndarray, mode: str, tau: float = 0.0, rng: np.random.Generator | None = None) -> Selection:
    if mode == "argmax":
        return select_argmax(rewards)
    if mode == "bradley_terry":
        if rng is None:
            raise ValueError("bradley_terry selection needs a seeded generator")
        return select_bradley_terry(rewards, tau, rng)
    raise ValueError(f"unknown selection mode {mode!r}; choose one of: {', '.join(SELECTIONS)}")
