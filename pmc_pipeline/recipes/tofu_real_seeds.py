"""`pmc tofu-real`'s chosen trials and their seeds. Once every trial of the grid (`methods`) has run, each
method's chosen trial is its most forgetting trial that keeps the utility floor; `seeds_at_chosen_trial` runs
it again with more seeds from the same checkpoint, so that each method's point is reported with its spread
over seeds (tofu_real.py runs the seeds, tofu_real_report.py reports them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pmc_pipeline.errors import PMCError


def method_of(settings: Any) -> str:
    """A tofu-real method entry's method: pmc unless it names a baseline."""
    return (settings or {}).get("method", "pmc")


def final_scores(eval_dirs: dict[str, Path], trials: list[str]) -> dict[str, tuple[float | None, float | None]]:
    """Each trial's final (unlearn quality, utility), from its evaluation."""
    scores: dict[str, tuple[float | None, float | None]] = {}
    for trial in trials:
        results = json.loads((eval_dirs[trial] / "eval.json").read_text(encoding="utf-8"))
        scores[trial] = tuple((results.get(key) or {}).get("value") for key in ("unlearn_quality", "utility"))
    return scores


def chosen_trials(scores: dict[str, tuple[float | None, float | None]], families: dict[str, str],
                  finetuned_utility: float, utility_floor: float) -> dict[str, str]:
    """Each method's chosen trial among `scores` (trial -> its final (unlearn quality, utility); `families`:
    trial -> method): the highest unlearn quality among its trials whose utility is at least `utility_floor`
    x the fine-tuned model's, or, when none keeps that floor, its highest utility. Ties go to the first trial."""
    chosen: dict[str, str] = {}
    for family in dict.fromkeys(families.values()):
        trials = [t for t in scores if families[t] == family and None not in scores[t]]
        kept = [t for t in trials if scores[t][1] >= utility_floor * finetuned_utility]
        if kept:
            chosen[family] = max(kept, key=lambda t: scores[t][0])
        elif trials:
            chosen[family] = max(trials, key=lambda t: scores[t][1])
    return chosen


def seed_runs(settings: Any, trial: str, trial_seed: int, seeds: int) -> dict[str, dict[str, Any]]:
    """The method entries that repeat `trial` (its method entry `settings`, trained with `trial_seed`) so that
    it has `seeds` seeds in all: its settings with seed `trial_seed` + 1, + 2, ..., named `<trial>-seed<seed>`."""
    return {f"{trial}-seed{trial_seed + k}": {**(settings or {}), "seed": trial_seed + k} for k in range(1, seeds)}


def check_seed_names(methods: dict[str, Any], trial_seeds: dict[str, int], seeds: int) -> None:
    """A seed run of any trial that would take the name of a method entry with other settings is refused up
    front (the chosen trials are known only after the grid). `trial_seeds`: each trial's training seed."""
    for trial in methods:
        for name, entry in seed_runs(methods[trial], trial, trial_seeds[trial], seeds).items():
            if name in methods and dict(methods[name] or {}) != entry:
                raise PMCError(f"methods.{name}: the name of trial {trial}'s seed run (seeds_at_chosen_trial={seeds}) "
                               f"with other settings; rename it")
