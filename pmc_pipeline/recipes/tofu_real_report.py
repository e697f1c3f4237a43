"""`pmc tofu-real`'s report: results.md / results.json (one column per model, every utility split
beside the paper's composite, the neighbour knowledge relative to the fine-tuned model with its 95%
bootstrap intervals, each method's front over its evaluated epochs, each method's greedy scores at every
evaluated epoch), curves.png, pareto.png and comparison.png (the paper's Figures 3 and 4 views), from the stages'
outputs: the benchmark folder, its evaluation folders and its settings (this module knows nothing of
how the stages ran)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pmc_pipeline.recipes.tofu_real_seeds import method_of
from pmc_pipeline.runtime.atomic import atomic_write_json, atomic_write_text


def _get(results: dict[str, Any], *path: str) -> float | None:
    for key in path:
        results = results.get(key) if isinstance(results, dict) else None
    return results if isinstance(results, (int, float)) else None


METRICS = [  # (label, key in results.json, how to read it from eval.json, format)
    ("forget recall", "forget", ("forget", "rouge_l_recall"), "{:.3f}"),
    ("paraphrased forget recall", "forget_paraphrased", ("forget_paraphrased", "rouge_l_recall"), "{:.3f}"),
    ("retain recall (the trained retain authors)", "retain", ("retain_short", "rouge_l_recall"), "{:.3f}"),
    ("world_facts recall", "world_facts", ("world_facts", "rouge_l_recall"), "{:.3f}"),
    ("real_authors recall", "real_authors", ("real_authors", "rouge_l_recall"), "{:.3f}"),
    ("unlearn quality (0-100)", "unlearn_quality", ("unlearn_quality", "value"), "{:.1f}"),
    ("utility, the paper's composite (0-100)", "utility", ("utility", "value"), "{:.1f}"),
    ("sampling attack: worst-case recall", "sampling_attack", ("sampling_attack", "mean_worst_case_recall"), "{:.3f}"),
    ("prefill attack: worst-case recall", "prefill_attack", ("prefill_attack", "sampled", "mean_worst_case_recall"),
     "{:.3f}"),
    ("MC: true answer most likely", "mc_most_likely", ("mc_leakage", "true_most_likely_rate"), "{:.0%}"),
    ("MC: true answer least likely", "mc_least_likely", ("mc_leakage", "true_least_likely_rate"), "{:.0%}"),
    ("MC: chance", "mc_chance", ("mc_leakage", "chance_rate"), "{:.0%}"),
    ("TOFU forget quality (KS p-value vs retain model)", "forget_quality", ("tofu", "forget_quality"), "{:.3g}"),
    ("TOFU model utility", "model_utility", ("tofu", "model_utility"), "{:.3f}"),
    ("TOFU forget truth ratio", "forget_truth_ratio", ("tofu", "forget", "truth_ratio"), "{:.3f}"),
    ("TOFU forget extraction strength", "extraction_strength", ("tofu", "forget", "extraction_strength"), "{:.3f}"),
    ("TOFU privleak (vs retain model)", "privleak", ("tofu", "privacy", "privleak"), "{:.1f}"),
    ("TOFU forget-vs-holdout membership AUC", "membership_auc", ("tofu", "privacy", "auc"), "{:.3f}"),
]
NEIGHBOURS = ("real_authors", "world_facts")  # knowledge next to the forget target that the composite can hide


def _against_itself(folder: Path) -> dict[str, float | None]:
    """The retain model's forget quality (1.0 by definition: its truth ratios against themselves) and
    privleak (0), computed from its per-example values as every other column's are."""
    from pmc_pipeline.eval import tofu_metrics as tm
    from pmc_pipeline.eval.tofu_standard import EXAMPLES_FILE

    rows = [json.loads(line) for line in (folder / EXAMPLES_FILE).read_text().splitlines() if line.strip()]
    ratios = [r["truth_ratio"] for r in rows if r["split"] == "forget"]
    auc = json.loads((folder / "eval.json").read_text())["tofu"]["privacy"].get("auc")
    return {"forget_quality": tm.forget_quality(ratios, ratios) if ratios else None,
            "privleak": tm.privleak(auc, auc) if auc is not None and auc != 1.0 else None}


def write_report(out: Path, eval_dirs: dict[str, Path], trials: list[str], settings: dict[str, Any],
                 reference: str, chosen: dict[str, list[str]]) -> dict[str, Any]:
    """results.json / results.md / curves.png / pareto.png / comparison.png in `out`: one column per evaluation folder
    (`eval_dirs`; "finetuned" among them), each unlearning run under out/runs/<name>. `trials`: the grid's runs,
    whose evaluated epochs make the fronts (Figure 3) and whose final models the attack view (Figure 4);
    `chosen`: each method's chosen trial and its seed runs (the trial first), summarised over those runs.
    `reference`: the retain model's column, whose forget quality and privleak are computed against itself."""
    seeded = [run for runs in chosen.values() for run in runs[1:]]
    methods = trials + seeded
    columns: dict[str, dict[str, Any]] = {}
    evaluations = {name: json.loads((folder / "eval.json").read_text()) for name, folder in eval_dirs.items()}
    for name, folder in eval_dirs.items():
        results = evaluations[name]
        column = {key: _get(results, *path) for _, key, path, _ in METRICS}
        if name == reference:
            column.update(_against_itself(folder))
        effects = json.loads((folder / "side_effects.json").read_text())
        column["side_effect_mean_change"] = effects.get("mean_change")
        if name in methods:
            lines = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
            last = json.loads(lines[-1])
            column.update(epochs=last["epoch"], unlearn_seconds=last.get("elapsed_seconds"))
        columns[name] = column
    base = columns["finetuned"]
    for column in columns.values():  # relative change of each neighbour split vs the fine-tuned model
        for split in NEIGHBOURS:
            b, v = base.get(split), column.get(split)
            column[f"{split}_change"] = (v - b) / b if b and v is not None else None
        changes = [column[f"{s}_change"] for s in NEIGHBOURS if column[f"{s}_change"] is not None]
        column["neighbour_knowledge_change"] = sum(changes) / len(changes) if changes else None
    rows = [(label, key, fmt) for label, key, _, fmt in METRICS] + [
        ("real_authors vs fine-tuned", "real_authors_change", "{:+.0%}"),
        ("world_facts vs fine-tuned", "world_facts_change", "{:+.0%}"),
        ("neighbour knowledge vs fine-tuned (mean of the two)", "neighbour_knowledge_change", "{:+.0%}"),
        (f"side effects vs {settings['side_effects_against']}: mean probability change of forget "
         "tokens", "side_effect_mean_change", "{:+.4f}"),
        ("unlearning epochs", "epochs", "{}"), ("unlearning seconds (evaluation excluded)", "unlearn_seconds", "{:.0f}")]
    names = list(columns)
    table = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in rows:
        table.append(f"| {label} | " + " | ".join("-" if columns[n].get(key) is None else fmt.format(columns[n][key])
                                                   for n in names) + " |")
    intervals = neighbour_intervals(evaluations)
    table += ["", "Neighbour knowledge with 95% bootstrap intervals over questions (the change against the "
              "fine-tuned and the base model resamples the questions jointly):", "",
              "| split | model | recall | vs fine-tuned | vs base |", "|---|---|---|---|---|"]
    table += [f"| {split} | {name} | {_span(i['recall'], '{:.3f}')} | {_span(i['vs_finetuned'], '{:+.0%}')} | "
              f"{_span(i['vs_base'], '{:+.0%}')} |" for split in NEIGHBOURS for name, by_split in intervals.items()
              if (i := by_split.get(split))]
    summary = seed_summary(columns, chosen)
    if summary:
        table += ["", f"Each method's chosen trial (the highest unlearn quality among its trials whose utility is at "
                  f"least {settings['chosen_utility_floor']:g} x the fine-tuned model's; none: its highest utility), over "
                  f"its seeds: mean [min, max]; side effects vs {settings['side_effects_against']}:", "",
                  "| metric | " + " | ".join(f"{m}: {s['trial']} ({len(s['runs'])} seed{'s' if len(s['runs']) > 1 else ''})"
                                            for m, s in summary.items()) + " |",
                  "|---|" + "---|" * len(summary)]
        for label, key, fmt in SEED_SUMMARY:
            cells = [s["metrics"].get(key) for s in summary.values()]
            table.append(f"| {label} | " + " | ".join(
                "-" if c is None else f"{fmt.format(c['mean'])} [{fmt.format(c['min'])}, {fmt.format(c['max'])}]"
                for c in cells) + " |")
    curves = {method: curve_points(out / "runs" / method) for method in methods}
    families = {m: method_of(settings["methods"].get(m)) for m in trials}
    fronts = epoch_fronts({trial: curves[trial] for trial in trials}, families)
    table += ["", "Each method's front over every evaluated epoch of its trials (the paper's Figure 3 view; greedy "
              "scores as the curves below; `overall`: on the front of all methods together):", "",
              "| method | trial | epoch | quality | utility | overall |", "|---|---|---:|---:|---:|---|"]
    table += [f"| {p['method']} | {p['trial']} | {p['epoch']} | {p['quality']:.1f} | {p['utility']:.1f} | "
              f"{'yes' if p['overall_front'] else ''} |" for p in fronts if p["method_front"]]
    table += ["", "Greedy scores during unlearning (every `evaluation.eval_every` epochs; neighbour changes vs "
              "the fine-tuned model's evaluation):", "", CURVE_HEADER, "|---|" + "---:|" * (len(CURVE_ROW) - 1)]
    table += [_curve_row(method, point, base) for method, points in curves.items() for point in points]
    report = {"columns": columns, "neighbour_intervals": intervals, "chosen": summary, "curves": curves,
              "fronts": fronts, "settings": settings}
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "results.md", "\n".join(table) + "\n")
    _draw_curves(curves, out / "curves.png")
    from pmc_pipeline.eval.plots import draw_trials_pareto
    from pmc_pipeline.recipes.sweep_dir import pareto_front

    points = [(n, c["unlearn_quality"], c["utility"]) for n, c in columns.items()
              if c["unlearn_quality"] is not None and c["utility"] is not None]
    front = pareto_front([(uq, u) for _, uq, u in points])
    draw_trials_pareto([(*p, f) for p, f in zip(points, front)], out / "pareto.png")
    from pmc_pipeline.eval.plots import draw_method_comparison

    attacks = {n: (c["sampling_attack"], c["prefill_attack"]) for n, c in columns.items() if n not in seeded}
    draw_method_comparison(fronts, curves_start(curves), attacks, out / "comparison.png")
    return report


SEED_SUMMARY = [  # (label, column key, format): the chosen trials' metrics summarised over seeds
    ("unlearn quality (0-100)", "unlearn_quality", "{:.1f}"), ("utility (0-100)", "utility", "{:.1f}"),
    ("sampling attack: worst-case recall", "sampling_attack", "{:.3f}"),
    ("prefill attack: worst-case recall", "prefill_attack", "{:.3f}"),
    ("MC: true answer least likely", "mc_least_likely", "{:.0%}"),
    ("TOFU forget quality", "forget_quality", "{:.3g}"), ("TOFU model utility", "model_utility", "{:.3f}"),
    ("real_authors vs fine-tuned", "real_authors_change", "{:+.0%}"),
    ("world_facts vs fine-tuned", "world_facts_change", "{:+.0%}"),
    ("side effects: mean probability change", "side_effect_mean_change", "{:+.4f}")]


def seed_summary(columns: dict[str, dict[str, Any]], chosen: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Per method: its chosen trial, its evaluated runs (the trial and its seed runs, each a column), and each
    SEED_SUMMARY metric's mean, min and max over them."""
    summary: dict[str, dict[str, Any]] = {}
    for method, runs in chosen.items():
        metrics: dict[str, dict[str, float]] = {}
        for _, key, _ in SEED_SUMMARY:
            values = [columns[run][key] for run in runs if columns[run].get(key) is not None]
            if values:
                metrics[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                                "n": len(values)}
        summary[method] = {"trial": runs[0], "runs": runs, "metrics": metrics}
    return summary


def epoch_fronts(curves: dict[str, list[dict[str, Any]]], families: dict[str, str]) -> list[dict[str, Any]]:
    """Every evaluated epoch after the start of every trial (`curves`' keys; `families`: each trial's method)
    as a point in (unlearn quality, utility), marked when it is on its method's Pareto front and on the
    front of all trials together (both maximised)."""
    from pmc_pipeline.recipes.sweep_dir import pareto_front

    points = [{"method": families[trial], "trial": trial, "epoch": p["epoch"], "quality": p["eval_unlearn_quality"],
               "utility": p["eval_utility"]} for trial, ps in curves.items() for p in ps
              if p["epoch"] > 0 and p.get("eval_utility") is not None]
    for point, on in zip(points, pareto_front([(p["quality"], p["utility"]) for p in points])):
        point["overall_front"] = on
    for method in dict.fromkeys(families.values()):
        own = [p for p in points if p["method"] == method]
        for point, on in zip(own, pareto_front([(p["quality"], p["utility"]) for p in own])):
            point["method_front"] = on
    return points


def curves_start(curves: dict[str, list[dict[str, Any]]]) -> tuple[float, float] | None:
    """The starting model's (quality, utility): every trial's epoch 0 (the same fine-tuned model)."""
    for points in curves.values():
        if points and points[0]["epoch"] == 0 and points[0].get("eval_utility") is not None:
            return points[0]["eval_unlearn_quality"], points[0]["eval_utility"]
    return None


def neighbour_intervals(evaluations: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model and neighbour split: the mean greedy recall and its 95% bootstrap interval over questions, and
    the relative change against the fine-tuned and the base model with its paired interval (None where a
    model lacks the split, or scored other questions)."""
    from pmc_pipeline.eval.intervals import mean_interval, relative_change_interval

    def scores(name: str, split: str) -> tuple[list[str], list[float]] | None:
        entry = (evaluations.get(name) or {}).get(split)
        generations = entry.get("generations") if isinstance(entry, dict) else None
        return ([g["question"] for g in generations], [g["recall"] for g in generations]) if generations else None

    def change(after: tuple[list[str], list[float]], before: tuple[list[str], list[float]] | None) -> Any:
        if before is None or before[0] != after[0] or not sum(before[1]):
            return None
        value = sum(after[1]) / sum(before[1]) - 1.0
        return {"value": value, "interval": list(relative_change_interval(after[1], before[1]))}

    result: dict[str, dict[str, dict[str, Any]]] = {}
    for name in evaluations:
        for split in NEIGHBOURS:
            own = scores(name, split)
            if own is None:
                continue
            result.setdefault(name, {})[split] = {
                "n": len(own[1]), "recall": {"value": sum(own[1]) / len(own[1]), "interval": list(mean_interval(own[1]))},
                "vs_finetuned": change(own, scores("finetuned", split)), "vs_base": change(own, scores("base", split))}
    return result


def _span(entry: dict[str, Any] | None, fmt: str) -> str:
    if entry is None:
        return "-"
    low, high = entry["interval"]
    return f"{fmt.format(entry['value'])} [{fmt.format(low)}, {fmt.format(high)}]"


SPLIT_CURVES = [("eval_unlearn_quality", "unlearn quality (0-100)"), ("eval_forget", "forget recall"),
                ("eval_forget_paraphrased", "paraphrased forget recall"), ("eval_retain_short", "retain recall"),
                ("eval_world_facts", "world_facts recall"), ("eval_real_authors", "real_authors recall")]
CURVE_ROW = [("method", "{}"), ("epoch", "{}"), ("elapsed_seconds", "{:.0f}"), ("eval_unlearn_quality", "{:.1f}"),
             ("eval_forget", "{:.3f}"), ("eval_forget_paraphrased", "{:.3f}"), ("eval_retain_short", "{:.3f}"),
             ("eval_world_facts", "{:.3f}"), ("eval_real_authors", "{:.3f}"), ("eval_utility", "{:.1f}"),
             ("world_facts_change", "{:+.0%}"), ("real_authors_change", "{:+.0%}")]
CURVE_HEADER = ("| method | epoch | seconds | quality | forget | paraphrased | retain | world_facts | real_authors "
                "| utility | world_facts vs fine-tuned | real_authors vs fine-tuned |")


def curve_points(run: Path) -> list[dict[str, Any]]:
    """The run's greedy evaluations: before unlearning (epoch 0) and every evaluated epoch."""
    points = [{"epoch": 0, "elapsed_seconds": 0.0, **json.loads((run / "eval_before.json").read_text())}]
    points += [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = [key for key, _ in CURVE_ROW[1:-2]]  # the logged ones: all but the method and the two changes
    return [{key: p.get(key) for key in keys} for p in points if p.get("eval_unlearn_quality") is not None]


def _curve_row(method: str, point: dict[str, Any], finetuned: dict[str, Any]) -> str:
    values = {"method": method, **point}
    for split in NEIGHBOURS:  # the greedy splits are the same questions as the evaluation's
        b, v = finetuned.get(split), point.get(f"eval_{split}")
        values[f"{split}_change"] = (v - b) / b if b and v is not None else None
    return "| " + " | ".join("-" if values.get(key) is None else fmt.format(values[key])
                             for key, fmt in CURVE_ROW) + " |"


def _draw_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Quality and each split against epoch (top) and wall-clock seconds (bottom), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SPLIT_CURVES), figsize=(4 * len(SPLIT_CURVES), 7), layout="constrained")
    for method, points in curves.items():
        for column, (key, title) in enumerate(SPLIT_CURVES):
            for row, x_key in enumerate(("epoch", "elapsed_seconds")):
                ax = axes[row][column]
                ax.plot([p[x_key] for p in points], [p.get(key) for p in points], marker="o", label=method)
                ax.set_title(title, fontsize="small")
                ax.set_xlabel("epoch" if row == 0 else "seconds of unlearning")
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
