"""Greedy TOFU-style metrics on a live rollout engine.

Definitions (paper Section 5, as in the reference code):
    R_split           mean ROUGE-L recall of the greedy answer against the split's ground-truth answer
    unlearn quality   UQ = 100 * (2 - R_forget - R_forget_paraphrased) / 2
    utility           U  = 100 * mean(R_retain_short, R_world_facts, R_real_authors)   (the splits available)
Fact leakage (demo data only): share of answers that still contain their key fact (case-insensitive).

`greedy_metrics` computes all of them over whichever splits the evaluation data holds
(pmc_pipeline/data/eval_splits.py) and says which splits fed unlearn quality and utility.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from pmc_pipeline.data.eval_splits import GREEDY_SPLITS, UTILITY_SPLITS, EvalData
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.method.rewards.rouge_l import rouge_l_recall


def greedy_answers(rollout: Any, formatter: PromptFormatter, questions: Sequence[str], max_tokens: int,
                   max_length: int | None = None) -> list[str]:
    """The engine's greedy answer to each question, decoded by the run's tokenizer: max_tokens new tokens,
    or, with `max_length`, as many as leave prompt + answer within it (evaluation.max_length)."""
    prompts = [formatter.prompt_ids(q) for q in questions]
    if max_length is None:
        return [formatter.decode(c.token_ids) for c in rollout.greedy(prompts, max_tokens)]
    # one call for the longest allowance, each answer cut to its own: a greedy answer cut to n tokens is the
    # greedy answer of n tokens
    allowed = [max(0, max_length - len(p)) for p in prompts]
    completions = rollout.greedy(prompts, max(1, max(allowed, default=1)))
    return [formatter.decode(c.token_ids[:n]) for c, n in zip(completions, allowed)]


def fact_leakage(answers: Sequence[str], key_facts: Sequence[str]) -> float:
    """Share of answers that still state their key fact."""
    if not answers:
        return 0.0
    hits = [fact.lower() in answer.lower() for answer, fact in zip(answers, key_facts)]
    return float(np.mean(hits))


def unlearn_quality(r_forget: float, r_paraphrased: float) -> float:
    return 100.0 * (2.0 - r_forget - r_paraphrased) / 2.0


def utility(utility_recalls: Sequence[float]) -> float:
    return 100.0 * float(np.mean(utility_recalls))


def greedy_metrics(rollout: Any, formatter: PromptFormatter, data: EvalData, max_tokens: int,
                   keep_generations: bool = True, max_length: int | None = None) -> dict[str, Any]:
    """Greedy ROUGE-L recall per split, unlearn quality and utility; one batched generate call.

    Returns {split: {"source", "n", "rouge_l_recall", "generations"?} or None, "unlearn_quality":
    {"value", "from"}, "utility": {"value", "from"}}; a skipped split is None."""
    present = [name for name in GREEDY_SPLITS if data.splits.get(name) is not None]
    questions = [q for name in present for q in data.splits[name].questions]
    generated = greedy_answers(rollout, formatter, questions, max_tokens, max_length)
    result: dict[str, Any] = {name: None for name in GREEDY_SPLITS}
    cursor = 0
    for name in present:
        split = data.splits[name]
        answers = generated[cursor:cursor + len(split.questions)]
        cursor += len(split.questions)
        recalls = [float(r) for r in rouge_l_recall(split.answers, answers)]
        entry: dict[str, Any] = {"source": split.source, "n": len(recalls), "rouge_l_recall": float(np.mean(recalls)),
                                 "fields": [split.question_field, split.answer_field]}
        if split.indices is not None:
            entry["indices"] = "fixed subset of {} rows ({} distinct)".format(len(split.indices), len(set(split.indices)))
        if keep_generations:
            entry["generations"] = [{"question": q, "answer": a, "generated": g, "recall": r}
                                    for q, a, g, r in zip(split.questions, split.answers, answers, recalls)]
        result[name] = entry
    result.update(summary_scores(result))
    return result


def summary_scores(per_split: dict[str, Any]) -> dict[str, Any]:
    """Unlearn quality from forget (+ paraphrased) and utility from the utility splits present."""
    recall = {name: per_split[name]["rouge_l_recall"] for name in GREEDY_SPLITS if per_split.get(name)}
    forget_parts = [name for name in ("forget", "forget_paraphrased") if name in recall]
    utility_parts = [name for name in UTILITY_SPLITS if name in recall]
    # with one forget split only, UQ = 100 * (1 - R): the same 0-100 scale, reported with its inputs
    uq = 100.0 * (1.0 - float(np.mean([recall[n] for n in forget_parts]))) if forget_parts else None
    return {
        "unlearn_quality": {"value": uq, "from": forget_parts},
        "utility": {"value": utility([recall[n] for n in utility_parts]) if utility_parts else None,
                    "from": utility_parts},
    }


def flat_scores(metrics: dict[str, Any], prefix: str = "eval_") -> dict[str, float | None]:
    """One number per metric (for metrics.jsonl and tables)."""
    flat = {f"{prefix}{name}": (metrics[name]["rouge_l_recall"] if metrics.get(name) else None) for name in GREEDY_SPLITS}
    flat[f"{prefix}unlearn_quality"] = metrics["unlearn_quality"]["value"]
    flat[f"{prefix}utility"] = metrics["utility"]["value"]
    return flat


class PeriodicEvaluator:
    """Greedy TOFU metrics during unlearning, on the live engine: every `every` epochs and after the last.

    `elapsed_seconds` (logged every epoch) is unlearning wall-clock time with evaluation time left out,
    so curves of runs with and without evaluation compare; a resumed run continues from `elapsed_before`."""

    def __init__(self, rollout: Any, formatter: PromptFormatter, data: EvalData, max_tokens: int, every: int,
                 last_epoch: int, elapsed_before: float = 0.0, max_length: int | None = None,
                 extra_scores: Callable[[], dict[str, float]] | None = None):
        """`extra_scores`: more figures measured with the same schedule and clock (PMC's `drift`)."""
        self._clock = time.perf_counter
        self.extra_scores = extra_scores
        self.rollout, self.formatter, self.data = rollout, formatter, data
        self.max_tokens, self.max_length, self.every, self.last_epoch = max_tokens, max_length, every, last_epoch
        self._started = self._clock()
        self._eval_seconds = 0.0
        self._elapsed_before = elapsed_before

    def scores(self) -> dict[str, Any]:
        start = self._clock()
        flat = flat_scores(greedy_metrics(self.rollout, self.formatter, self.data, self.max_tokens,
                                          keep_generations=False, max_length=self.max_length))
        if self.extra_scores is not None:
            flat.update(self.extra_scores())
        seconds = self._clock() - start
        self._eval_seconds += seconds
        return {**flat, "seconds_eval": round(seconds, 4)}

    def due(self, epoch: int) -> bool:
        """Whether the model after `epoch` is evaluated."""
        return epoch % self.every == 0 or epoch == self.last_epoch

    def after_epoch(self, epoch: int) -> dict[str, Any]:
        """The fields this epoch adds to its metrics.jsonl line."""
        fields = self.scores() if self.due(epoch) else {}
        fields["elapsed_seconds"] = round(self._elapsed_before + self._clock() - self._started - self._eval_seconds, 3)
        return fields
