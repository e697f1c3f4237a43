"""The checkpoint's model card: a Hugging Face `README.md` (YAML metadata + prose), written with
huggingface_hub's ModelCard classes.

`pmc unlearn` writes its first version into `checkpoint-final/` (base model, method and settings, what
was unlearned); `pmc evaluate` rewrites it with the evaluation's numbers as `model-index` results.
What was unlearned is described by count and split name, never by content: no forget question or
answer enters the card. A `README.md` that pmc did not write is left as it is (the card then goes
into the evaluation folder instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pmc_pipeline.runtime.atomic import atomic_write_text

CARD = "README.md"
MARKER = "<!-- written by pmc (pmc_pipeline/eval/model_card.py) -->"
METHOD_KEYS = ("epochs", "lambda_retain", "min_len", "reward", "selection", "fast", "lambda_align",
               "restart_every", "restart_on_plateau")
SAMPLING_KEYS = ("num_samples", "temperature", "top_p", "max_tokens")
# (model-index metric type, name, how to read it from eval.json)
CARD_METRICS = [
    ("unlearn_quality", "PMC paper: unlearn quality (0-100)", ("unlearn_quality", "value")),
    ("utility", "PMC paper: utility (0-100)", ("utility", "value")),
    ("forget_rouge_l_recall", "forget ROUGE-L recall (greedy)", ("forget", "rouge_l_recall")),
    ("sampling_attack_worst_case_recall", "sampling attack: worst-case recall", ("sampling_attack", "mean_worst_case_recall")),
    ("tofu_forget_quality", "TOFU forget quality", ("tofu", "forget_quality")),
    ("tofu_model_utility", "TOFU model utility", ("tofu", "model_utility")),
    ("tofu_forget_truth_ratio", "TOFU forget truth ratio", ("tofu", "forget", "truth_ratio")),
    ("tofu_extraction_strength", "TOFU forget extraction strength", ("tofu", "forget", "extraction_strength")),
    ("tofu_privleak", "TOFU privleak", ("tofu", "privacy", "privleak")),
]


def _get(results: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = results
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


SUMMARY = "pmc_unlearning.json"  # beside the weights: what the card says of the run, for later rewrites


def card_text(name: str, base_model: str | None, unlearning: dict[str, Any] | None,
              results: dict[str, Any] | None = None) -> str:
    """The card: `unlearning` (unlearning_summary's; None for a model pmc did not unlearn) holds the
    method's settings and the forget / retain counts and split names; `results`: eval.json's content."""
    from huggingface_hub import EvalResult, ModelCardData

    evals = [EvalResult(task_type="text-generation", task_name="Unlearning (TOFU)", dataset_type="locuslab/TOFU",
                        dataset_name="TOFU", metric_type=kind, metric_name=label, metric_value=value)
             for kind, label, path in CARD_METRICS if results and (value := _get(results, path)) is not None]
    data = ModelCardData(base_model=base_model, library_name="transformers", tags=["unlearning", "pmc", "tofu"],
                         model_name=name, eval_results=evals or None)
    lines = [f"---\n{data.to_yaml()}\n---", MARKER, f"# {name}", ""]
    if unlearning is None:
        lines += ["Not unlearned by pmc; `pmc evaluate`'s measurements of it on TOFU.", ""]
    else:
        settings = ", ".join(f"{k} {v}" for k, v in unlearning["settings"].items())
        method = unlearning.get("method", "pmc")
        counts = (f"{unlearning['forget_questions']} forget question(s) from `{unlearning['forget_split']}`, "
                  f"{unlearning['retain_pairs']} retain question/answer pair(s) from `{unlearning['retain_split']}`.")
        if method == "pmc":
            lines += [f"`{base_model}` unlearned with Partial Model Collapse (PMC, pmc): {counts} PMC trains on the "
                      "model's own sampled answers to the forget questions, never on their true answers.", ""]
        else:
            trained_on = ("**It trained on the forget questions' ground-truth answers**, which PMC never does."
                          if unlearning.get("trains_on_forget_answers") else
                          "It trained on refusal lines, not on the forget questions' true answers.")
            lines += [f"`{base_model}` unlearned with the baseline {method.upper()} (pmc `method: {method}`): "
                      f"{counts} {trained_on}", ""]
        if unlearning.get("stopped"):
            stop = unlearning["stopped"]
            settings += f"; stopped by the stopping rule after epoch {stop['epoch']} ({stop['reason']})"
        lines += [f"Settings: {settings}.", "",
                  f"What this shows, and what it does not: {'PMC' if method == 'pmc' else method.upper()} removes "
                  "information from the model's *outputs* "
                  "under the tested attacks (greedy answers, sampling and prefill attacks, and the likelihood metrics "
                  "below where evaluated); it proves nothing about what the weights still hold.", ""]
    if evals:
        lines += ["| metric | value |", "|---|---|"] + [f"| {e.metric_name} | {e.metric_value:.4g} |" for e in evals]
    else:
        lines.append("Not evaluated yet (`pmc evaluate` adds its numbers here).")
    return "\n".join(lines) + "\n"


def write_model_card(checkpoint: Path, text: str, fallback_dir: Path | None = None) -> Path | None:
    """`text` as checkpoint/README.md unless a README.md that pmc did not write is there; then into
    `fallback_dir` (None: not written). The path written."""
    target = Path(checkpoint) / CARD
    if target.is_file() and MARKER not in target.read_text(encoding="utf-8", errors="replace"):
        if fallback_dir is None:
            return None
        target = Path(fallback_dir) / CARD
    atomic_write_text(target, text)
    return target


def unlearning_summary(cfg: Any, forget_questions: int, retain_pairs: int) -> dict[str, Any]:
    """The card's account of a run: counts and split names (no content), the method and its settings, and
    whether it trained on the ground-truth forget answers (the baselines but IDK do; PMC never)."""
    if cfg.method == "pmc":
        settings = {f"pmc.{k}": getattr(cfg.pmc, k) for k in METHOD_KEYS}
        settings.update({f"sampling.{k}": getattr(cfg.sampling, k) for k in SAMPLING_KEYS})
        trains_on_answers = False
    else:
        from pmc_pipeline.method.baselines import resolve_baseline

        baseline = resolve_baseline(cfg.method)
        settings = {"baseline.epochs": cfg.baseline.epochs,
                    "baseline.lambda_retain": (baseline.lambda_retain if cfg.baseline.lambda_retain is None
                                               else cfg.baseline.lambda_retain)}
        settings.update({f"baseline.{k}": v for k, v in {**baseline.params, **cfg.baseline.overrides()}.items()})
        trains_on_answers = baseline.trains_on_forget_answers
    settings["trainer.learning_rate"] = cfg.trainer.learning_rate
    return {"method": cfg.method, "trains_on_forget_answers": trains_on_answers,
            "forget_split": Path(cfg.data.forget).name, "retain_split": Path(cfg.data.retain).name,
            "forget_questions": forget_questions, "retain_pairs": retain_pairs, "settings": settings}
