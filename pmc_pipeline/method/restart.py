"""When to restart ("cascaded collapse"): the current model becomes the new original.

- every K epochs (`restart_every`), or
- on a plateau (`restart_on_plateau`): the mean selected reward has not beaten its best since the
  last restart by more than `plateau_eps` for `plateau_patience` epochs in a row, while it is still
  below the maximum (a run that has fully collapsed is done, not stuck).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RestartPolicy:
    every: int = 0  # 0: never on a schedule
    on_plateau: bool = False
    plateau_patience: int = 3
    plateau_eps: float = 0.01
    max_reward: float = 1.0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.epochs_since_restart = 0
        self.best = float("-inf")
        self.stale_epochs = 0

    def after_epoch(self, reward_mean: float) -> str | None:
        """Record one epoch's mean selected reward; returns the reason to restart now, or None."""
        self.epochs_since_restart += 1
        if reward_mean > self.best + self.plateau_eps:
            self.best, self.stale_epochs = reward_mean, 0
        else:
            self.stale_epochs += 1
        if self.every and self.epochs_since_restart >= self.every:
            return "every"
        if (self.on_plateau and self.stale_epochs >= self.plateau_patience
                and reward_mean < self.max_reward - self.plateau_eps):
            return "plateau"
        return None
