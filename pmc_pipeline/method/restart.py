"""When to restart ("cascaded collapse"): the current model becomes the new original.

- every K epochs (`restart_every`), or
- on a plateau (`restart_on_plateau`): the mean selected reward has not beaten its best since the
  last restart by more than `plateau_eps` for `plateau_patience` epochs in a row, while it is still
  below the maximum (a run that has fully collapsed is done, not stuck).
"""

from __future__ import annotations

from pmc_pipeline.method.rewards.common import MAX_REWARD
from pmc_pipeline.schema import PMCConfig


class RestartPolicy:
    """The restart settings of `pmc:` and the state they act on (epochs since the last restart, the best
    mean reward since then), which a resumed run restores."""

    def __init__(self, pmc: PMCConfig) -> None:
        self.pmc = pmc
        self.reset()

    def reset(self) -> None:
        self.epochs_since_restart = 0
        self.best = float("-inf")
        self.stale_epochs = 0

    def after_epoch(self, reward_mean: float) -> str | None:
        """Record one epoch's mean selected reward; returns the reason to restart now, or None."""
        p = self.pmc
        self.epochs_since_restart += 1
        if reward_mean > self.best + p.plateau_eps:
            self.best, self.stale_epochs = reward_mean, 0
        else:
            self.stale_epochs += 1
        if p.restart_every and self.epochs_since_restart >= p.restart_every:
            return "every"
        if (p.restart_on_plateau and self.stale_epochs >= p.plateau_patience
                and reward_mean < MAX_REWARD - p.plateau_eps):
            return "plateau"
        return None
