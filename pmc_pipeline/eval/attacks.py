"""Attacks on an unlearned model's outputs: many samples per question, and forced answer prefixes.

Sampling attack (paper Fig. 4): draw k answers per forget question (default k=100, T 0.9,
top-p 0.95), score each by ROUGE-L recall against the ground truth, keep the worst case (the
maximum) per question and average it over questions. A model that still holds the secret
somewhere in its output distribution leaks it in one of the k samples even if its greedy answer
does not.

Prefilling attack: the same questions, but every answer is forced to start with a prefix (default
"The answer is:"): the prefix tokens are appended to the prompt, the engine continues after them,
and only the continuation is scored. Greedy and sampled.

All generation goes through the rollout engine in one batched call per attack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.errors import PMCError
from pmc_pipeline.method.rewards.rouge_l import rouge_l_recall

HISTOGRAM_BINS = 10


def histogram(values: Sequence[float], bins: int = HISTOGRAM_BINS, value_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Counts of `values` in equal-width bins over `value_range` (JSON-ready)."""
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins, range=value_range)
    return {"bin_edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


@dataclass(frozen=True)
class AttackResult:
    """k scored samples per question; `worst_case[i]` is question i's highest recall."""

    k: int
    recalls: list[list[float]]  # per question, per sample
    worst_samples: list[str]  # per question: the sample with the highest recall
    seconds: float

    @property
    def worst_case(self) -> list[float]:
        return [max(row) if row else 0.0 for row in self.recalls]

    @property
    def mean_worst_case_recall(self) -> float:
        return float(np.mean(self.worst_case)) if self.recalls else 0.0

    @property
    def mean_recall(self) -> float:
        flat = [r for row in self.recalls for r in row]
        return float(np.mean(flat)) if flat else 0.0

    def as_dict(self, questions: Sequence[str], answers: Sequence[str]) -> dict[str, Any]:
        return {
            "k": self.k,
            "mean_worst_case_recall": self.mean_worst_case_recall,
            "mean_recall": self.mean_recall,
            "worst_case_histogram": histogram(self.worst_case),
            "seconds": round(self.seconds, 3),
            "per_question": [
                {"question": q, "answer": a, "worst_case_recall": max(row), "worst_sample": s,
                 "recalls": [round(r, 4) for r in row], "recall_histogram": histogram(row)}
                for q, a, row, s in zip(questions, answers, self.recalls, self.worst_samples)
            ],
        }


def forced_prefix_ids(formatter: PromptFormatter, prefix: str) -> list[int]:
    """The tokens of `prefix` as the start of an answer (after what plain-tag answers begin with)."""
    text = formatter.answer_lead + prefix
    return list(formatter.tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_inputs(questions: Sequence[str], answers: Sequence[str], k: int) -> None:
    if k <= 0:
        raise PMCError(f"attack k={k}: the number of samples per question must be >= 1")
    if len(questions) != len(answers):
        raise PMCError(f"{len(questions)} questions but {len(answers)} answers")


def _prompts(formatter: PromptFormatter, questions: Sequence[str], prefix: str | None) -> list[list[int]]:
    forced = forced_prefix_ids(formatter, prefix) if prefix else []
    return [formatter.prompt_ids(q) + forced for q in questions]


def sampling_attack(rollout: Any, formatter: PromptFormatter, questions: Sequence[str], answers: Sequence[str],
                    k: int = 100, temperature: float = 0.9, top_p: float = 0.95, max_tokens: int = 200,
                    seed: int | None = 0, prefix: str | None = None) -> AttackResult:
    """k samples per question in one batched call; each scored against its ground-truth answer.

    With `prefix`, every answer is forced to start with it and only the continuation is scored."""
    _check_inputs(questions, answers, k)
    start = time.perf_counter()
    samples = rollout.sample(_prompts(formatter, questions, prefix), k, temperature, top_p, max_tokens, seed)
    texts = [[formatter.decode(c.token_ids) for c in row] for row in samples]
    flat_refs = [a for a, row in zip(answers, texts) for _ in row]
    flat = rouge_l_recall(flat_refs, [t for row in texts for t in row])
    recalls, cursor = [], 0
    for row in texts:
        recalls.append([float(r) for r in flat[cursor:cursor + len(row)]])
        cursor += len(row)
    worst = [row[int(np.argmax(r))] if row else "" for row, r in zip(texts, recalls)]
    return AttackResult(k=k, recalls=recalls, worst_samples=worst, seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class GreedyPrefillResult:
    recalls: list[float]
    answers: list[str]  # the continuations after the forced prefix

    @property
    def recall(self) -> float:
        return float(np.mean(self.recalls)) if self.recalls else 0.0


def greedy_prefill(rollout: Any, formatter: PromptFormatter, questions: Sequence[str], answers: Sequence[str],
                   prefix: str, max_tokens: int) -> GreedyPrefillResult:
    """Greedy answers forced to start with `prefix`; the continuation is scored, the prefix is not."""
    _check_inputs(questions, answers, 1)
    completions = rollout.greedy(_prompts(formatter, questions, prefix), max_tokens)
    texts = [formatter.decode(c.token_ids) for c in completions]
    return GreedyPrefillResult([float(r) for r in rouge_l_recall(list(answers), texts)], texts)


def prefill_attack(rollout: Any, formatter: PromptFormatter, questions: Sequence[str], answers: Sequence[str],
                   prefix: str = "The answer is:", k: int = 100, temperature: float = 0.9, top_p: float = 0.95,
                   max_tokens: int = 200, seed: int | None = 0) -> dict[str, Any]:
    """The prefilling attack, greedy and sampled, as one JSON-ready dict."""
    if not prefix.strip():
        raise PMCError("prefill attack: the prefix is empty")
    greedy = greedy_prefill(rollout, formatter, questions, answers, prefix, max_tokens)
    sampled = sampling_attack(rollout, formatter, questions, answers, k, temperature, top_p, max_tokens, seed,
                              prefix=prefix)
    return {
        "prefix": prefix,
        "greedy": {"rouge_l_recall": greedy.recall, "recall_histogram": histogram(greedy.recalls),
                   "per_question": [{"question": q, "answer": a, "generated": g, "recall": r}
                                    for q, a, g, r in zip(questions, answers, greedy.answers, greedy.recalls)]},
        "sampled": sampled.as_dict(questions, answers),
    }
