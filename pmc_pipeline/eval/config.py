"""The `evaluation:`, `attack:` and `probes:` config sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pmc_pipeline.checks import above, at_least, at_most, one_of
from pmc_pipeline.data.neighbour_halves import HALVES


@dataclass
class EvalConfig:
    """Greedy TOFU metrics (pmc_pipeline/data/eval_splits.py says which split feeds which metric)."""

    max_tokens: int = 200
    # greedy answers: at most this many prompt + answer tokens (the PMC reference's generation `max_length`,
    # 200), so a longer prompt leaves fewer answer tokens; null: max_tokens new tokens whatever the prompt
    max_length: Optional[int] = None
    retain_split_for_eval: Optional[str] = None  # null: data.retain
    eval_every: int = 0  # `pmc unlearn`: greedy metrics every K epochs on the live engine (0: off)
    forget: Optional[str] = None  # null: data.forget (it must then hold the answers)
    forget_perturbed: Optional[str] = "auto"  # auto: "<forget>_perturbed"; null: no paraphrase metric
    retain_short_indices: Optional[str] = "auto"  # auto: the TOFU 400 for retain90; a JSON file; null: all rows
    world_facts: Optional[str] = "world_facts"
    real_authors: Optional[str] = "real_authors"
    # real_authors and world_facts (and their _perturbed companions): every row (all), or one half of a fixed
    # split by neighbour_seed (data/neighbour_halves.py): selection for whatever tunes or chooses on
    # neighbour questions, report for the numbers reported
    neighbour_half: str = "all"
    neighbour_seed: int = 0
    # TOFU's standard metrics (pmc_pipeline/eval/tofu_standard.py): likelihood-scored splits (auto: TOFU's
    # split of that name where data.tofu_dir has it; a file; null: skipped), a holdout of questions never
    # trained on (privacy leakage), and a retain model's earlier `pmc evaluate` folder (forget quality)
    tofu_metrics: bool = True
    retain_perturbed: Optional[str] = "auto"
    real_authors_perturbed: Optional[str] = "auto"
    world_facts_perturbed: Optional[str] = "auto"
    holdout: Optional[str] = None
    retain_model_eval: Optional[str] = None
    # `pmc evaluate`: lm-evaluation-harness tasks (arc_easy, arc_challenge, mmlu, or tofu_mc:<split or
    # file> for a local multiple-choice task; pmc_pipeline/eval/extended_utility.py), examples per task
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: Optional[int] = None

    def __post_init__(self) -> None:
        at_least(self, 1, "max_tokens", "lm_eval_limit", "max_length")
        at_least(self, 0, "eval_every")
        one_of(self, "neighbour_half", HALVES)


@dataclass
class AttackConfig:
    """Sampling and prefilling attacks on the forget questions (`pmc evaluate`)."""

    k: int = 100  # samples per question
    temperature: float = 0.9
    top_p: float = 0.95
    max_tokens: int = 200
    prefix: str = "The answer is:"
    sampling: bool = True
    prefill: bool = True

    def __post_init__(self) -> None:
        at_least(self, 1, "k", "max_tokens")
        above(self, 0, "temperature", "top_p")
        at_most(self, 1, "top_p")


@dataclass
class ProbeConfig:
    multiple_choice: bool = True  # needs perturbed_answer in the paraphrase split (skipped otherwise)
    side_effect_base: Optional[str] = None  # checkpoint to compare with; null: a run dir's model.path
    side_effect_text: Optional[str] = None  # null: the shipped text; a .txt file; or datasets:<name>[:<config>[:<split>]]
    side_effect_window: int = 128  # tokens per scored window

    def __post_init__(self) -> None:
        at_least(self, 8, "side_effect_window")
