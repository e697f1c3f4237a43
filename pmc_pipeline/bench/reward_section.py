"""Reward throughput: the project's ROUGE-L recall vs rouge-score's per-pair scorer, same pairs.

Two PMC workload shapes, each one reference per question x n samples:
- an epoch: TOFU forget10 with the Llama reference setting, 400 questions x 20 samples = 8,000 pairs;
- a sampling attack (method.md): 400 questions x 100 samples = 40,000 pairs.
Samples are made from the reference's own words and other corpus words (realistic overlap, every
sample a new text). The project's scorer caches stemmed words and tokenised texts, so it is timed
three ways: cold (empty caches: a run's first epoch), steady (words cached, all texts new: later
epochs) and repeat (the very same pairs again: an upper bound, not a realistic epoch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pmc_pipeline.bench.figures import BenchReport, timed
from pmc_pipeline.method.rewards import rouge_l as reward

SHAPES = {"epoch": (400, 20), "attack": (400, 100)}  # (questions, samples per question)


@dataclass(frozen=True)
class RewardWorkload:
    references: list[str]  # one per pair
    candidates: list[str]


def make_workload(answers: Sequence[str], questions: int, n: int, seed: int) -> RewardWorkload:
    """`questions` references drawn from `answers`, each with n sampled-looking candidates."""
    rng = random.Random(seed)
    vocabulary = " ".join(answers).split()
    references, candidates = [], []
    for q in range(questions):
        ref = answers[q % len(answers)]
        words = ref.split()
        for _ in range(n):
            kept = rng.sample(words, rng.randint(0, len(words)))  # some of the secret, out of order
            noise = rng.choices(vocabulary, k=rng.randint(0, max(4, len(words))))
            mixed = kept + noise
            rng.shuffle(mixed)
            references.append(ref)
            candidates.append(" ".join(mixed))
    return RewardWorkload(references, candidates)


def rouge_score_recall(references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
    """The baseline: rouge-score's own scorer, one pair at a time (how the reference code scores)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(r, c)["rougeL"].recall for r, c in zip(references, candidates)])


def compare_scores(ours: np.ndarray, theirs: np.ndarray) -> dict[str, object]:
    """Exact comparison: ROUGE-L recall is LCS / reference length, the same float on both sides."""
    return {"pairs": int(len(theirs)), "identical": bool(np.array_equal(ours, theirs)),
            "max_abs_diff": float(np.abs(ours - theirs).max()) if len(theirs) else 0.0,
            "nonzero_scores": int((theirs > 0).sum())}


def bench_reward(report: BenchReport, answers: Sequence[str], repeats: int, seed: int = 0,
                 shapes: dict[str, tuple[int, int]] = SHAPES) -> None:
    """Adds reward.* figures (pairs/s) and the identical-score check for every workload shape."""
    warm_up = make_workload(answers, 4, 4, seed - 1)  # first-call costs (imports, regexes) stay out of the timings
    rouge_score_recall(warm_up.references, warm_up.candidates)
    reward.rouge_l_recall(warm_up.references, warm_up.candidates)
    for shape, (questions, n) in shapes.items():
        runs: dict[str, list[float]] = {"rouge_score": [], "cold": [], "steady": [], "repeat": []}
        checks = []
        for repeat in range(repeats):
            load = make_workload(answers, questions, n, seed + repeat)
            # steady state: the word cache warmed by a different sample set of the same vocabulary
            earlier = make_workload(answers, questions, n, seed + 10_000 + repeat)
            pairs = len(load.candidates)
            seconds, theirs = timed(lambda: rouge_score_recall(load.references, load.candidates))
            runs["rouge_score"].append(pairs / seconds)
            reward.clear_caches()
            seconds, ours = timed(lambda: reward.rouge_l_recall(load.references, load.candidates))
            runs["cold"].append(pairs / seconds)
            seconds, _ = timed(lambda: reward.rouge_l_recall(load.references, load.candidates))
            runs["repeat"].append(pairs / seconds)
            reward.clear_caches()
            reward.rouge_l_recall(earlier.references, earlier.candidates)
            reward.clear_caches(words=False)  # texts new, stemmed words known
            seconds, steady = timed(lambda: reward.rouge_l_recall(load.references, load.candidates))
            runs["steady"].append(pairs / seconds)
            checks.append(compare_scores(ours, theirs))
            checks.append(compare_scores(steady, theirs))
        label = f"{questions} questions x {n} samples"
        report.add(f"reward.{shape}.rouge_score", "pairs/s", runs["rouge_score"], f"{label}, per-pair scorer")
        for mode, what in (("cold", "empty caches"), ("steady", "words cached, texts new"),
                           ("repeat", "same pairs again")):
            report.add(f"reward.{shape}.pmc_{mode}", "pairs/s", runs[mode], f"{label}, {what}")
            report.add_ratio(f"reward.{shape}.speedup_{mode}", f"reward.{shape}.pmc_{mode}",
                             f"reward.{shape}.rouge_score", f"vs rouge-score, {what}")
        report.checks[f"reward.{shape}.identical_scores"] = {
            "identical": all(c["identical"] for c in checks),
            "pairs_compared": sum(c["pairs"] for c in checks),
            "max_abs_diff": max(c["max_abs_diff"] for c in checks),
            "nonzero_scores": sum(c["nonzero_scores"] for c in checks),
        }
