"""Rewards as plug-ins: a name (or a dotted path) in `pmc.reward` picks the function.

A reward function maps the original model's answers and the current samples to a matrix of
rewards in [0, 1] (1 = as far from the secret as it gets):

    fn(references: list[str], samples: list[list[str]], **params) -> np.ndarray [questions, n]

Built in:
- `rouge_l` (default): 1 - ROUGE-L recall against the reference (the paper's reward).
- `self_bleu`: 1 - self-BLEU of a sample against the other n - 1 samples of its question (the
  paper's Appendix A.7): samples unlike each other win, whatever the reference said.
- `semantic`: 1 - cosine similarity to the reference under the all-MiniLM-L6-v2 sentence encoder,
  optionally mixed with closeness to a refusal set: (1 - w) * (1 - cos(x, y)) + w * max cos(x, refusal).
Anything else with a dot in it is imported: `package.module.function` or `package.module:function`.

The short-answer penalty composes with every reward: r' = max(0, r - exp(-words)) for samples
under `min_len` words, which for `rouge_l` is exactly 1 - min(1, recall + penalty).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import numpy as np

from pmc_pipeline.errors import ConfigError
from pmc_pipeline.method.rewards.common import MAX_REWARD, check_shape
from pmc_pipeline.method.rewards.rouge_l import rouge_l_reward, short_answer_penalty
from pmc_pipeline.method.rewards.self_bleu import self_bleu_reward
from pmc_pipeline.method.rewards.semantic import semantic_reward

RewardFn = Callable[..., np.ndarray]
__all__ = ["MAX_REWARD", "RewardFn", "register_reward", "resolve_reward", "score"]


REWARDS: dict[str, RewardFn] = {
    "rouge_l": rouge_l_reward,
    "self_bleu": self_bleu_reward,
    "semantic": semantic_reward,
}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make `fn` selectable as pmc.reward=<name>."""
    REWARDS[name] = fn


def resolve_reward(name: str) -> RewardFn:
    """A built-in name, or a user function by dotted path; ConfigError naming pmc.reward otherwise."""
    if name in REWARDS:
        return REWARDS[name]
    if "." not in name and ":" not in name:
        raise ConfigError(f"pmc.reward={name!r} is not a known reward; choose one of: {', '.join(REWARDS)} "
                          "or give a dotted path to a function (package.module.function)")
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"pmc.reward={name!r}: cannot load the function ({exc})") from None
    if not callable(fn):
        raise ConfigError(f"pmc.reward={name!r} is not a callable")
    return fn


def score(fn: RewardFn, references: Sequence[str], samples: Sequence[Sequence[str]], min_len: int,
          **params: Any) -> np.ndarray:
    """The reward matrix with the short-answer penalty applied, checked to be [questions, n] in [0, 1]."""
    n = check_shape(references, samples)
    if not samples:
        return np.zeros((0, 0))
    rewards = np.asarray(fn(list(references), [list(row) for row in samples], **params), dtype=np.float64)
    if rewards.shape != (len(samples), n):
        raise ValueError(f"reward function returned shape {rewards.shape}, expected {(len(samples), n)}")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("reward function returned NaN or infinite values")
    penalty = short_answer_penalty([text for row in samples for text in row], min_len).reshape(len(samples), n)
    return np.clip(rewards - penalty, 0.0, MAX_REWARD)
