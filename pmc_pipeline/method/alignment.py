"""PMC-alignment: steer collapsed answers towards refusals while the model has not yet collapsed.

    loss = forget + lambda_retain * retain + lambda_align * (1 - gamma) * align

gamma is the mean reward of the samples the forget term trains on this epoch (our rollout batch is
the epoch), and `align` is SFT on (forget question, a random refusal). As the rewards reach their
maximum the term fades out, so it shapes what the model collapses to without fighting the collapse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.errors import ConfigError
from pmc_pipeline.schema import PMCConfig
from trainer.records import TrainExample

DEFAULT_REFUSALS = Path(__file__).resolve().parents[1] / "resources" / "refusals.txt"


def load_refusals(path: str | Path | None = None, setting: str = "pmc.refusals_file") -> list[str]:
    """One refusal per line; blank lines and lines starting with '#' are skipped. `setting` names the key
    that gave `path` in errors."""
    path = Path(path) if path else DEFAULT_REFUSALS
    if not path.is_file():
        raise ConfigError(f"{setting}: {path} is not a file (expected one refusal per line)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    refusals = [line for line in lines if line and not line.startswith("#")]
    if not refusals:
        raise ConfigError(f"{setting}: {path} holds no refusals (expected one per line)")
    return refusals


def refusals_for(pmc: PMCConfig) -> list[str]:
    """The refusals a run's `pmc:` settings use (PMC-alignment, the semantic reward's refusal term), else none."""
    uses_refusals = pmc.lambda_align > 0 or (pmc.reward == "semantic" and pmc.semantic_refusal_weight > 0)
    return load_refusals(pmc.refusals_file) if uses_refusals else []


def alignment_weight(lambda_align: float, gamma: float) -> float:
    """lambda_align * (1 - gamma): 0 once the selected rewards are at their maximum (gamma = 1)."""
    return max(0.0, lambda_align * (1.0 - gamma))


def align_examples(formatter: PromptFormatter, questions: Sequence[str], refusals: Sequence[str],
                   rng: np.random.Generator, max_length: int) -> list[TrainExample]:
    """One (question, random refusal) SFT example per question, role 'align'."""
    picks = rng.integers(len(refusals), size=len(questions))
    return [formatter.example(q, refusals[i], "align", max_length) for q, i in zip(questions, picks)]


# An answer counts as refusal-like when its best cosine similarity to a refusal phrasing (all-MiniLM-L6-v2)
# is at least this. Measured on the shipped set: 7 other refusal wordings (not in the set) score 0.45-0.76
# (median 0.61, 6 of 7 >= 0.5); all 180 true answers of the demo authors score <= 0.35 (mean 0.21);
# collapsed gibberish ("B B B", "One ofccra, G, in 1970.") scores 0.21-0.26.
REFUSAL_LIKE_THRESHOLD = 0.5


def refusal_report(rollout, formatter: PromptFormatter, questions: Sequence[str], refusals: Sequence[str],
                   max_tokens: int, threshold: float = REFUSAL_LIKE_THRESHOLD) -> dict[str, float]:
    """How refusal-like the current model's greedy answers to `questions` are."""
    from pmc_pipeline.method.rewards.semantic import refusal_similarity

    greedy = rollout.greedy([formatter.prompt_ids(q) for q in questions], max_tokens)
    similarity = refusal_similarity([formatter.decode(c.token_ids) for c in greedy], refusals)
    return {"refusal_similarity": float(similarity.mean()), "refusal_like_share": float((similarity >= threshold).mean())}
