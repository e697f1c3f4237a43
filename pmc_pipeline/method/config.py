"""The `pmc:` and `baseline:` config sections: the methods' settings, checked beside their fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pmc_pipeline.checks import above, at_least, at_most, one_of

BUILTIN_REWARDS = ("rouge_l", "self_bleu", "semantic")  # pmc.reward also takes a dotted path
SELECTIONS = ("argmax", "bradley_terry")
DEFAULT_CHUNKS = 4  # chunks per epoch when pmc.chunk_questions is null


@dataclass
class PMCConfig:
    epochs: int = 30
    lambda_retain: float = 1.0  # loss = lambda_retain * retain + forget
    lambda_keep: float = 1.0  # + lambda_keep * keep (data.keep's questions, the starting model's answers)
    min_len: int = 0  # short-answer penalty threshold in words; 0 disables it
    reward: str = "rouge_l"  # rouge_l | self_bleu | semantic | a dotted path to your own function
    semantic_refusal_weight: float = 0.0  # semantic reward: weight of closeness to the refusal set
    selection: str = "argmax"  # argmax | bradley_terry
    bt_tau: float = 0.1  # Bradley-Terry temperature (softmax over reward / tau); 0 is argmax
    reference_max_tokens: int = 200  # greedy answers of the original model
    fast: bool = False  # PMC-fast: cache the best answer per question, stop sampling converged ones
    lambda_align: float = 0.0  # PMC-alignment: + lambda_align * (1 - gamma) * refusal SFT; 0 is off
    refusals_file: Optional[str] = None  # one refusal per line; null: pmc_pipeline/resources/refusals.txt
    restart_every: int = 0  # restart (new references = the current model's greedy answers) every K epochs
    restart_on_plateau: bool = False  # restart when the selected-reward mean stalls (see restart.py)
    plateau_patience: int = 3  # epochs without an improvement > plateau_eps
    plateau_eps: float = 0.01
    # An epoch's questions are shuffled and cut into chunks; each chunk is sampled, scored and trained in
    # turn (method/loop.py). A multiple of trainer.batch_size x trainer.world_size; null: about a quarter
    # of the questions, rounded up to whole optimizer steps (x trainer.grad_accum; see chunk_size).
    chunk_questions: Optional[int] = None
    overlap: bool = True  # sample chunk k+1 while the trainer trains chunk k (same weights and metrics as false)
    # The stopping rule (method/stopping.py), checked at evaluated epochs (evaluation.eval_every): stop once
    # the greedy forget answers' ROUGE-L recall of the original model's answers is at most this ...
    stop_at_reference_recall: Optional[float] = None
    # ... or once the greedy keep answers' recall of their starting answers falls below this (needs data.keep)
    stop_below_keep_recall: Optional[float] = None

    def __post_init__(self) -> None:
        at_least(self, 1, "epochs", "reference_max_tokens", "plateau_patience", "chunk_questions")
        at_least(self, 0, "lambda_retain", "lambda_keep", "min_len", "semantic_refusal_weight", "bt_tau", "lambda_align",
                  "restart_every", "plateau_eps", "stop_at_reference_recall", "stop_below_keep_recall")
        at_most(self, 1, "semantic_refusal_weight", "stop_at_reference_recall", "stop_below_keep_recall")
        one_of(self, "selection", SELECTIONS)
        if self.reward not in BUILTIN_REWARDS and "." not in self.reward and ":" not in self.reward:
            raise ValueError(f"reward={self.reward!r} is not allowed; choose one of: {', '.join(BUILTIN_REWARDS)}, "
                             "or a dotted path to a function (package.module.function)")


# `method:` in an unlearn config: PMC, or one of the paper's baselines (method/baselines/, same names)
BASELINE_NAMES = ("ga", "gd", "idk", "dpo", "npo", "simnpo")
METHODS = ("pmc", *BASELINE_NAMES)


@dataclass
class BaselineConfig:
    """The `baseline:` section: how a baseline (`method: npo`, ...) trains. Null settings take the method's
    defaults, the PMC paper's Appendix B values (method/baselines/__init__.py lists them)."""

    epochs: int = 5  # passes over the forget set, each forget example paired with one retain example
    lambda_retain: Optional[float] = None  # loss = forget term + lambda_retain * retain NLL
    beta: Optional[float] = None  # DPO, NPO, SimNPO: inverse temperature of the preference term
    delta: Optional[float] = None  # SimNPO: margin
    # IDK and DPO: refusal lines (one per line) that replace the forget answers; null: pmc's built-in set
    # (pmc_pipeline/resources/refusals.txt)
    refusals_file: Optional[str] = None

    def __post_init__(self) -> None:
        at_least(self, 1, "epochs")
        at_least(self, 0, "lambda_retain", "delta")
        above(self, 0, "beta")

    def overrides(self) -> dict[str, float]:
        """The method parameters set here (beta, delta), for `Baseline.loss`."""
        return {name: getattr(self, name) for name in ("beta", "delta") if getattr(self, name) is not None}
