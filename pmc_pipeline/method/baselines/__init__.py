"""The PMC paper's six baselines as losses, one small module each, behind a registry (as rewards are).

A baseline's loss reads only answer-token log-probs (`AnswerScores`, by role) that the trainer
computes; the trainer knows no method names. Total loss = forget term + lambda * retain term, the
form of PMC's loss. Every baseline but IDK trains on the ground-truth forget answers, which PMC never
does (`trains_on_forget_answers`); DPO and NPO also compare with the frozen starting model
(`needs_reference`: its sequence log-probs, computed once before training).

Defaults are the PMC paper's Appendix B settings (../shared docs: field.md):

| name | forget term | lambda (retain) | beta | delta |
|---|---|---|---|---|
| ga | -NLL(forget answers) | 0 (no retain term) | - | - |
| gd | -NLL(forget answers) | 1 | - | - |
| idk | NLL(refusal lines) | 1.25 | - | - |
| dpo | refusal preferred to the true answer, vs the reference | 1 | 0.1 | - |
| npo | the true answer as a loser, vs the reference | 1.5 | 0.05 | - |
| simnpo | length-normalised NPO without a reference, margin delta | 0.25 | 4 | 0 |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pmc_pipeline.errors import ConfigError
from pmc_pipeline.method.baselines.dpo import dpo_forget_loss
from pmc_pipeline.method.baselines.ga import ga_forget_loss
from pmc_pipeline.method.baselines.idk import idk_forget_loss, idk_targets
from pmc_pipeline.method.baselines.npo import npo_forget_loss
from trainer.scores import AnswerScores
from pmc_pipeline.method.baselines.simnpo import simnpo_forget_loss

__all__ = ["FORGET", "REFUSALS", "RETAIN", "AnswerScores", "BASELINES", "Baseline", "BaselineObjective", "idk_targets", "resolve_baseline"]

FORGET = "forget"  # rows of the true forget answers
REFUSALS = "refusals"  # rows of the forget questions answered by a refusal line
RETAIN = "retain"  # rows of retain answers: the retain term's


@dataclass(frozen=True)
class Baseline:
    """One method: its forget term over the roles it reads, and its paper settings."""

    name: str
    forget_loss: Callable[..., torch.Tensor]  # (AnswerScores of each role in `reads`, **params)
    reads: tuple[str, ...]
    lambda_retain: float
    params: dict[str, float] = field(default_factory=dict)
    needs_reference: bool = False

    @property
    def trains_on_forget_answers(self) -> bool:
        return FORGET in self.reads

    def loss(self, rows: dict[str, AnswerScores], retain_term: torch.Tensor | None,
             lambda_retain: float | None = None, **params: float) -> torch.Tensor:
        """forget term + lambda * retain term. `params` override the defaults."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise ConfigError(f"baseline {self.name}: unknown setting(s) {sorted(unknown)}; "
                              f"it takes {sorted(self.params) or 'none'}")
        missing = [role for role in self.reads if role not in rows]
        if missing:
            raise ValueError(f"baseline {self.name} reads rows {missing}, which the batch lacks")
        weight = self.lambda_retain if lambda_retain is None else lambda_retain
        forget_term = self.forget_loss(*(rows[role] for role in self.reads), **{**self.params, **params})
        if weight and retain_term is not None:
            return forget_term + weight * retain_term
        return forget_term


BASELINES: dict[str, Baseline] = {
    "ga": Baseline("ga", ga_forget_loss, (FORGET,), lambda_retain=0.0),
    "gd": Baseline("gd", ga_forget_loss, (FORGET,), lambda_retain=1.0),
    "idk": Baseline("idk", idk_forget_loss, (REFUSALS,), lambda_retain=1.25),
    "dpo": Baseline("dpo", dpo_forget_loss, (REFUSALS, FORGET), lambda_retain=1.0, params={"beta": 0.1},
                    needs_reference=True),
    "npo": Baseline("npo", npo_forget_loss, (FORGET,), lambda_retain=1.5, params={"beta": 0.05},
                    needs_reference=True),
    "simnpo": Baseline("simnpo", simnpo_forget_loss, (FORGET,), lambda_retain=0.25,
                       params={"beta": 4.0, "delta": 0.0}),
}


@dataclass(frozen=True)
class BaselineObjective:
    """A baseline as the trainer's objective (`trainer.scores.Objective`): its loss with the NLL of the
    batch's "retain" rows (or their KL from the starting model) as the retain term. Picklable: it travels
    to the trainer ranks."""

    name: str
    lambda_retain: float | None = None
    params: dict[str, float] = field(default_factory=dict)
    retain_loss: str = "nll"  # nll, or kl: the KL from the starting model (the trainer's kl_roles hold "retain")

    def __call__(self, rows: dict[str, AnswerScores]) -> torch.Tensor:
        retain = None
        if RETAIN in rows:
            retain = rows[RETAIN].mean_kl() if self.retain_loss == "kl" else rows[RETAIN].mean_nll()
        return resolve_baseline(self.name).loss(rows, retain, self.lambda_retain, **self.params)


def resolve_baseline(name: str) -> Baseline:
    """The registered baseline `name`; ConfigError listing the known ones otherwise."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose one of: {', '.join(BASELINES)}")
    return BASELINES[name]

