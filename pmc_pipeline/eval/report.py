"""`pmc evaluate`'s printed table and report.md, from eval.json's results (no engine, no files read)."""

from __future__ import annotations

from typing import Any

from pmc_pipeline.eval.extended_utility import METRICS as LM_EVAL_METRICS


TABLE_ROWS = [
    ("forget ROUGE-L recall (greedy)", lambda r: _recall(r, "forget"), "{:.3f}"),
    ("paraphrased forget recall", lambda r: _recall(r, "forget_paraphrased"), "{:.3f}"),
    ("retain_short recall", lambda r: _recall(r, "retain_short"), "{:.3f}"),
    ("world_facts recall", lambda r: _recall(r, "world_facts"), "{:.3f}"),
    ("real_authors recall", lambda r: _recall(r, "real_authors"), "{:.3f}"),
    ("unlearn quality (0-100)", lambda r: r["unlearn_quality"]["value"], "{:.1f}"),
    ("utility (0-100)", lambda r: r["utility"]["value"], "{:.1f}"),
    ("sampling attack: worst-case recall", lambda r: (r.get("sampling_attack") or {}).get("mean_worst_case_recall"), "{:.3f}"),
    ("prefill attack: greedy recall", lambda r: ((r.get("prefill_attack") or {}).get("greedy") or {}).get("rouge_l_recall"), "{:.3f}"),
    ("prefill attack: worst-case recall", lambda r: ((r.get("prefill_attack") or {}).get("sampled") or {}).get("mean_worst_case_recall"), "{:.3f}"),
    ("MC: true answer least likely", lambda r: (r.get("mc_leakage") or {}).get("true_least_likely_rate"), "{:.0%}"),
    ("TOFU forget quality (KS p-value vs retain model)", lambda r: _tofu(r, "forget_quality"), "{:.3g}"),
    ("TOFU model utility", lambda r: _tofu(r, "model_utility"), "{:.3f}"),
    ("TOFU forget truth ratio", lambda r: _tofu(r, "forget", "truth_ratio"), "{:.3f}"),
    ("TOFU forget probability", lambda r: _tofu(r, "forget", "probability"), "{:.3f}"),
    ("TOFU forget extraction strength", lambda r: _tofu(r, "forget", "extraction_strength"), "{:.3f}"),
    ("TOFU privleak (min-k 40%, vs retain model)", lambda r: _tofu(r, "privacy", "privleak"), "{:.1f}"),
    ("TOFU forget-vs-holdout membership AUC", lambda r: _tofu(r, "privacy", "auc"), "{:.3f}"),
]


def _tofu(results: dict[str, Any], *keys: str) -> Any:
    value = results.get("tofu")
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _recall(results: dict[str, Any], split: str) -> float | None:
    return results[split]["rouge_l_recall"] if results.get(split) else None


def results_table(columns: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one column per evaluated model; '-' where a metric was not computed."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = list(TABLE_ROWS)
    tasks = dict.fromkeys(task for n in names for task in (columns[n].get("lm_eval") or {}))
    rows += [(f"lm-eval {task}: {metric}", lambda r, t=task, m=metric: ((r.get("lm_eval") or {}).get(t) or {}).get(m),
              "{:.3f}") for task in tasks for metric in LM_EVAL_METRICS]
    for label, get, fmt in rows:
        values = [get(columns[n]) for n in names]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else fmt.format(v) for v in values) + " |")
    return "\n".join(lines)


def report_markdown(results: dict[str, Any], effects: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [f"# pmc evaluate: {settings['checkpoint']}", "", results_table({"value": results}), ""]
    a = settings["attack"]
    lines += [f"Sampling attack: k={a['k']} samples per forget question, T={a['temperature']}, top-p={a['top_p']}, "
              f"max {a['max_tokens']} tokens; worst case = the highest ROUGE-L recall of the k samples. "
              f"Prefill attack: answers forced to start with \"{a['prefix']}\" (not scored).", ""]
    if "mean_change" in effects:
        lines += [f"Side effects: {effects['occurrences']} occurrences of {effects['forget_tokens']} forget-specific "
                  f"tokens in {effects['text']}; mean probability change (unlearned - base) "
                  f"{effects['mean_change']:+.4f} (mean |change| {effects['mean_abs_change']:.4f}).", ""]
    else:
        lines += [f"Side effects: not measured ({effects.get('skipped')}).", ""]
    lines += ["Data used:", ""]
    for name, info in settings["data"].items():
        lines.append(f"- {name}: " + (f"{info['source']} ({info['n']} questions)" if "source" in info
                                      else f"not evaluated ({info.get('skipped')})"))
    if results.get("mc_leakage") is None:
        lines.append(f"- multiple-choice probe: not run ({settings['data_notes'].get('mc_leakage', 'turned off')})")
    tofu = results.get("tofu")
    if tofu is None:
        lines.append(f"- TOFU's standard metrics: not computed ({settings['data_notes'].get('tofu_metrics', 'no split with perturbed answers')})")
    else:
        for key in ("forget_quality", "model_utility"):
            if tofu.get(f"{key}_note"):
                lines.append(f"- TOFU {key.replace('_', ' ')}: not computed ({tofu[f'{key}_note']})")
        if tofu["privacy"].get("note"):
            lines.append(f"- TOFU privleak: {'not computed' if tofu['privacy']['privleak'] is None else 'partial'} "
                         f"({tofu['privacy']['note']})")
    return "\n".join(lines) + "\n"
