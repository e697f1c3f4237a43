"""Leakage probes that read the model's probabilities instead of its generations.

Multiple-choice leakage (paper Fig. 5b/c): for each forget question, the options are TOFU's
paraphrased true answer and its perturbed (wrong) answers. Each option is scored by its
length-normalised likelihood, exp(mean answer-token log-prob) (inverse perplexity), and the scores
are normalised over the options. A model that has *forgotten* should treat the true answer like
the others; one that has only learnt to avoid it makes it the least likely option far more often
than chance (1 / number of options), which leaks which option is true.

Side effects (paper Fig. 5a): the change in probability of forget-answer tokens inside unrelated
text, between two checkpoints (base vs unlearned). Forget tokens are the tokens of the ground-truth
forget answers that never occur in the retain answers (the forget-specific vocabulary); every
occurrence of one in the text is scored by p(token | preceding text) under both models.

Log-probs come from the rollout engine (vLLM prompt logprobs): no second model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pmc_pipeline.data.eval_splits import MultipleChoiceItem
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.errors import DataError, first_line
from pmc_pipeline.eval.attacks import histogram

SIDE_EFFECT_TEXT = Path(__file__).resolve().parents[1] / "resources" / "side_effect_text.txt"


def answer_token_scores(rollout: Any, formatter: PromptFormatter,
                        pairs: Sequence[tuple[str, str]]) -> list[list[tuple[float, int]]]:
    """Each (question, answer)'s (log-prob, vocabulary rank) per answer token, end-of-answer marker
    included: the engine's answer_logprob_ranks, one batched call."""
    examples = [formatter.example(q, a, "probe") for q, a in pairs]
    return rollout.answer_logprob_ranks([(list(e.input_ids), e.answer_start) for e in examples])


def answer_logprob_means(rollout: Any, formatter: PromptFormatter, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Mean log-prob of each answer's tokens (end-of-answer marker included) given its question."""
    return [float(np.mean([lp for lp, _ in answer])) if answer else float("-inf")
            for answer in answer_token_scores(rollout, formatter, pairs)]


def multiple_choice_leakage(rollout: Any, formatter: PromptFormatter, items: Sequence[MultipleChoiceItem],
                            means: Sequence[float] | None = None) -> dict[str, Any]:
    """How often the true answer is the least (and the most) likely option; option-probability spread.
    `means`: the options' mean answer-token log-probs, item after item, when already scored."""
    if not items:
        raise DataError("multiple-choice probe: no questions")
    pairs = [(item.question, option) for item in items for option in [item.true_answer, *item.wrong_answers]]
    if means is None:
        means = answer_logprob_means(rollout, formatter, pairs)
    elif len(means) != len(pairs):
        raise ValueError(f"multiple-choice probe: {len(means)} option scores for {len(pairs)} options")
    least, most, chance, min_prob, true_prob, cursor = [], [], [], [], [], 0
    for item in items:
        count = 1 + len(item.wrong_answers)
        scores = np.asarray(means[cursor:cursor + count])
        cursor += count
        probs = np.exp(scores - scores.max())  # inverse perplexities, normalised over the options
        probs /= probs.sum()
        least.append(int(np.argmin(probs)) == 0)
        most.append(int(np.argmax(probs)) == 0)
        chance.append(1.0 / count)
        min_prob.append(float(probs.min()))
        true_prob.append(float(probs[0]))
    return {
        "questions": len(items),
        "options_per_question": sorted({1 + len(i.wrong_answers) for i in items}),
        "true_least_likely_rate": float(np.mean(least)),
        "true_most_likely_rate": float(np.mean(most)),
        "chance_rate": float(np.mean(chance)),
        "min_option_probability": {"mean": float(np.mean(min_prob)), "histogram": histogram(min_prob)},
        "true_option_probability": {"mean": float(np.mean(true_prob)), "histogram": histogram(true_prob)},
    }


def load_side_effect_text(setting: str | None) -> tuple[str, str]:
    """(text, where from): the shipped text, a .txt file, or `datasets:<name>[:<config>[:<split>]]`."""
    if not setting:
        return SIDE_EFFECT_TEXT.read_text(encoding="utf-8"), f"pmc_pipeline/resources/{SIDE_EFFECT_TEXT.name}"
    if setting.startswith("datasets:"):
        import datasets

        parts = setting.split(":")[1:] + [None, None]
        name, config, split = parts[0], parts[1], parts[2] or "test"
        datasets.disable_progress_bars()
        try:
            table = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # offline machines, unknown names
            raise DataError(f"probes.side_effect_text={setting}: cannot load the corpus: {first_line(exc)}") from None
        if "text" not in table.column_names:
            raise DataError(f"probes.side_effect_text={setting}: the corpus has no 'text' column")
        return "\n".join(t for t in table["text"] if t.strip()), setting
    path = Path(setting)
    if not path.is_file():
        raise DataError(f"probes.side_effect_text: file not found: {path}")
    return path.read_text(encoding="utf-8"), str(path)


def forget_specific_tokens(formatter: PromptFormatter, forget_answers: Sequence[str],
                           retain_answers: Sequence[str]) -> set[int]:
    """Token ids of the forget answers that no retain answer uses (special tokens excluded)."""
    tok = formatter.tokenizer

    def ids(texts: Sequence[str]) -> set[int]:
        return {i for t in texts for i in tok(" " + t.strip(), add_special_tokens=False)["input_ids"]}

    return ids(forget_answers) - ids(retain_answers) - set(tok.all_special_ids)


def text_windows(formatter: PromptFormatter, text: str, window: int) -> list[list[int]]:
    """The text's tokens in consecutive windows of `window` tokens (BOS first when the model has one)."""
    tok = formatter.tokenizer
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    step = window - len(bos)
    return [bos + ids[s:s + step] for s in range(0, len(ids), step) if len(ids[s:s + step]) > 1]


def token_probabilities(rollout: Any, windows: list[list[int]], targets: set[int]) -> list[float]:
    """p(token | preceding window) of every occurrence of a target token, in text order."""
    probs = []
    for ids, row in zip(windows, rollout.prompt_logprobs(windows)):
        probs += [float(np.exp(lp)) for token, lp in zip(ids, row) if lp is not None and token in targets]
    return probs


def side_effect_summary(base: Sequence[float], unlearned: Sequence[float], tokens: int, source: str) -> dict[str, Any]:
    delta = np.asarray(unlearned) - np.asarray(base)
    if not len(delta):
        return {"text": source, "forget_tokens": tokens, "occurrences": 0,
                "skipped": "the text holds none of the forget-specific tokens"}
    return {
        "text": source, "forget_tokens": tokens, "occurrences": int(len(delta)),
        "mean_probability_base": float(np.mean(base)), "mean_probability_unlearned": float(np.mean(unlearned)),
        "mean_change": float(delta.mean()), "mean_abs_change": float(np.abs(delta).mean()),
        "change_histogram": histogram(delta, value_range=(-1.0, 1.0), bins=20),
    }
