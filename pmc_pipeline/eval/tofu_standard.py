"""TOFU's standard metrics on the engine that is already running (no second model load).

One batched prompt-log-prob call scores every answer option of every likelihood split (forget and
retain: the answer, the paraphrased answer and 5 perturbed ones; real_authors and world_facts: the
answer and 3 perturbed ones; the holdout's answers): each token's log-prob and whether it is the
teacher-forced argmax. The formulas are pmc_pipeline/eval/tofu_metrics.py. ROUGE for model utility
is the greedy answers' ROUGE-L recall, taken from the greedy splits where they asked the same
question, generated here for the rest.

Per-example values go to `tofu_examples.jsonl` in the evaluation folder (no question or answer
text: a short hash names each question), aggregates to eval.json's `tofu`. Forget quality and
privleak compare with a *retain model* (never trained on the forget authors) through its own earlier
`pmc evaluate` folder (`evaluation.retain_model_eval`); without one they are null, with the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pmc_pipeline.data.eval_splits import OPTION_SPLITS, EvalData, OptionSplit
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.errors import DataError
from pmc_pipeline.eval import tofu_metrics as tm
from pmc_pipeline.eval.metrics import greedy_answers
from pmc_pipeline.eval.probes import answer_token_scores
from pmc_pipeline.method.rewards.rouge_l import rouge_l_recall

EXAMPLES_FILE = "tofu_examples.jsonl"
UTILITY_PARTS = ("retain", "real_authors", "world_facts")


def question_key(question: str) -> str:
    """How per-example files name a question without holding its text."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class ScoredAnswer:
    logprobs: list[float]  # per answer token (end-of-answer marker included)
    argmax_is_label: list[bool]


def score_answers(rollout: Any, formatter: PromptFormatter, pairs: Sequence[tuple[str, str]]) -> list[ScoredAnswer]:
    """Each (question, answer)'s answer-token log-probs and argmax hits, in one batched engine call."""
    return [ScoredAnswer([lp for lp, _ in answer], [rank == 1 for _, rank in answer])
            for answer in answer_token_scores(rollout, formatter, pairs)]


@dataclass(frozen=True)
class RetainModelEval:
    """What forget quality and privleak compare with: a retain model's evaluation of the same questions."""

    folder: str
    forget_truth_ratios: list[float]
    membership_auc: float | None


def load_retain_model_eval(folder: str | None, forget: OptionSplit | None) -> RetainModelEval | None:
    """The retain model's per-example forget truth ratios (and membership AUC) from its evaluation folder;
    an error in one line when it is missing or scored other questions."""
    if not folder:
        return None
    path = Path(folder) / EXAMPLES_FILE
    if not path.is_file():
        raise DataError(f"evaluation.retain_model_eval {folder}: no {EXAMPLES_FILE} (expected the folder of an "
                        f"earlier `pmc evaluate` of the retain model, with evaluation.tofu_metrics on)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    theirs = [r for r in rows if r["split"] == "forget"]
    if forget is None:
        raise DataError(f"evaluation.retain_model_eval {folder}: this evaluation has no forget split with perturbed "
                        f"answers to compare with")
    ours = [question_key(q) for q in forget.questions]
    if [r["question"] for r in theirs] != ours:
        differs = next((i for i, (a, b) in enumerate(zip(ours, [r["question"] for r in theirs])) if a != b),
                       min(len(ours), len(theirs)))
        raise DataError(f"evaluation.retain_model_eval {folder}: its forget truth ratios are for other questions "
                        f"({len(theirs)} rows vs {len(ours)}; the first difference at forget row {differs + 1}); "
                        f"evaluate the retain model on the same forget split")
    summary = json.loads((Path(folder) / "eval.json").read_text(encoding="utf-8")).get("tofu") or {}
    return RetainModelEval(folder, [r["truth_ratio"] for r in theirs], (summary.get("privacy") or {}).get("auc"))


def _option_pairs(split: OptionSplit) -> tuple[list[tuple[str, str]], list[tuple[int, int, int]]]:
    """Every (question, option) to score and, per row, where its answer / correct / perturbed start."""
    pairs, spans = [], []
    for q, answer, correct, wrong in zip(split.questions, split.answers, split.correct, split.perturbed):
        start = len(pairs)
        options = [answer] + ([correct] if correct != answer else []) + wrong
        pairs += [(q, option) for option in options]
        spans.append((start, start + (1 if correct != answer else 0), start + len(options) - len(wrong)))
    return pairs, spans


def _rows(split_name: str, split: OptionSplit, scored: list[ScoredAnswer], spans) -> list[dict[str, Any]]:
    """Per-example values; `scored` holds this split's options in `_option_pairs` order."""
    rows = []
    ends = [start for start, _, _ in spans[1:]] + [len(scored)]
    for q, (answer_at, correct_at, wrong_at), end in zip(split.questions, spans, ends):
        answer, correct = scored[answer_at], scored[correct_at]
        wrong = [w.logprobs for w in scored[wrong_at:end]]
        rows.append({
            "split": split_name, "question": question_key(q),
            "p_answer": tm.answer_probability(answer.logprobs), "p_correct": tm.answer_probability(correct.logprobs),
            "p_perturbed": [tm.answer_probability(lp) for lp in wrong],
            "mean_logprob_options": [float(np.mean(correct.logprobs)), *(float(np.mean(lp)) for lp in wrong)],
            "normalised_probability": tm.normalised_probability(answer.logprobs, wrong),
            "truth_ratio": tm.truth_ratio(correct.logprobs, wrong),
            "extraction_strength": tm.extraction_strength(answer.argmax_is_label),
            "min_k": tm.min_k_score(answer.logprobs),
        })
    return rows


def _rouge(rollout: Any, formatter: PromptFormatter, split: OptionSplit, greedy: dict[str, Any],
           max_tokens: int, max_length: int | None) -> float:
    """Mean greedy ROUGE-L recall on `split`'s questions: answers the greedy splits already gave to the same
    question and answer are reused, the others generated."""
    known = {(g["question"], g["answer"]): g["recall"] for entry in greedy.values() if isinstance(entry, dict)
             for g in entry.get("generations") or []}
    missing = [(q, a) for q, a in zip(split.questions, split.answers) if (q, a) not in known]
    if missing:
        answers = greedy_answers(rollout, formatter, [q for q, _ in missing], max_tokens, max_length)
        known.update({pair: float(r) for pair, r in zip(missing, rouge_l_recall([a for _, a in missing], answers))})
    return float(np.mean([known[(q, a)] for q, a in zip(split.questions, split.answers)]))


def option_means(rows: list[dict[str, Any]], split: str = "forget") -> list[float]:
    """The mean log-probs of the correct and the perturbed options, row after row (what the
    multiple-choice probe scores): the forget options need not be scored twice."""
    return [mean for r in rows if r["split"] == split for mean in r["mean_logprob_options"]]


def tofu_standard_metrics(rollout: Any, formatter: PromptFormatter, data: EvalData, greedy: dict[str, Any],
                          max_tokens: int, reference: RetainModelEval | None, max_length: int | None = None
                          ) -> tuple[dict[str, Any], list[dict]]:
    """(eval.json's `tofu` entry, the per-example rows). `greedy`: greedy_metrics' result (generations kept);
    `max_tokens` / `max_length`: the limit of greedy answers generated here (evaluation.max_length)."""
    present = [name for name in OPTION_SPLITS if data.options.get(name) is not None]
    pairs, parts = [], {}  # parts: split -> (offset of its options in `pairs`, how many, per-row spans)
    for name in present:
        split_pairs, spans = _option_pairs(data.options[name])
        parts[name] = (len(pairs), len(split_pairs), spans)
        pairs += split_pairs
    holdout_at = len(pairs)
    if data.holdout is not None:
        pairs += list(zip(data.holdout.questions, data.holdout.answers))
    scored = score_answers(rollout, formatter, pairs)  # one batched call for everything
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for name in present:
        split, (offset, count, spans) = data.options[name], parts[name]
        split_rows = _rows(name, split, scored[offset:offset + count], spans)
        rows += split_rows
        ratios = [r["truth_ratio"] for r in split_rows]
        entry = {"source": split.source, "n": len(split_rows),
                 "extraction_strength": float(np.mean([r["extraction_strength"] for r in split_rows]))}
        if name in ("forget", "retain"):
            entry["probability"] = float(np.mean([r["p_answer"] for r in split_rows]))
        else:  # real_authors, world_facts: the answer's share among its options
            entry["probability"] = float(np.mean([r["normalised_probability"] for r in split_rows]))
        entry["truth_ratio"] = tm.forget_truth_ratio_score(ratios) if name == "forget" else tm.truth_ratio_score(ratios)
        if name in UTILITY_PARTS:
            entry["rouge"] = _rouge(rollout, formatter, split, greedy, max_tokens, max_length)
        summary[name] = entry
    for name in OPTION_SPLITS:
        summary.setdefault(name, None)
    holdout_rows = []
    if data.holdout is not None:
        holdout_rows = [{"split": "holdout", "question": question_key(q), "p_answer": tm.answer_probability(s.logprobs),
                         "min_k": tm.min_k_score(s.logprobs)} for q, s in zip(data.holdout.questions, scored[holdout_at:])]
        rows += holdout_rows
    summary.update(_model_utility(summary, data.notes))
    summary.update(_forget_quality(summary, rows, reference))
    summary["privacy"] = _privacy(rows, holdout_rows, reference, data.notes)
    summary["retain_model_eval"] = reference.folder if reference else None
    return summary, rows


def _model_utility(summary: dict[str, Any], notes: dict[str, str]) -> dict[str, Any]:
    missing = [name for name in UTILITY_PARTS if summary.get(name) is None]
    if missing:
        return {"model_utility": None, "model_utility_note": "needs " + ", ".join(
            f"{name} ({notes.get(f'tofu_{name}', 'absent')})" for name in missing)}
    values = [summary[name][key] for name in UTILITY_PARTS for key in ("probability", "rouge", "truth_ratio")]
    return {"model_utility": tm.model_utility(values), "model_utility_note": None}


def _forget_quality(summary: dict[str, Any], rows: list[dict], reference: RetainModelEval | None) -> dict[str, Any]:
    if summary.get("forget") is None:
        return {"forget_quality": None, "forget_quality_note": "no forget split with perturbed answers"}
    if reference is None:
        return {"forget_quality": None, "forget_quality_note": "no retain model to compare with (set "
                "evaluation.retain_model_eval to the retain model's evaluation folder)"}
    ours = [r["truth_ratio"] for r in rows if r["split"] == "forget"]
    return {"forget_quality": tm.forget_quality(ours, reference.forget_truth_ratios), "forget_quality_note": None}


def _privacy(rows: list[dict], holdout: list[dict], reference: RetainModelEval | None,
             notes: dict[str, str]) -> dict[str, Any]:
    forget = [r["min_k"] for r in rows if r["split"] == "forget"]
    if not forget or not holdout:
        return {"min_k": tm.MIN_K, "auc": None, "privleak": None,
                "note": notes.get("holdout") if not holdout else "no forget split with perturbed answers"}
    auc = tm.membership_auc(forget, [r["min_k"] for r in holdout])
    ref = reference.membership_auc if reference else None
    note = None if ref is not None else ("no retain model to compare with (set evaluation.retain_model_eval)"
                                         if reference is None else "the retain model's evaluation had no holdout")
    return {"min_k": tm.MIN_K, "auc": auc, "retain_model_auc": ref,
            "privleak": tm.privleak(auc, ref) if ref is not None else None, "note": note}
