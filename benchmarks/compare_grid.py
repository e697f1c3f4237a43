"""The comparison's trials from several `pmc tofu-real` runs in one table and one Figure 3 / 4 view.

    .venv/bin/python benchmarks/compare_grid.py OUT.png RESULTS.json [RESULTS.json ...]

A comparison run that spans sittings may leave its trials in more than one out_dir; each RESULTS.json is
a tofu-real report (results.json) of the same benchmark, a later file's model replacing an earlier one's
of the same name. They are merged only when they start from the same fine-tuned model: its greedy scores
and attacks must be equal in every run, which is checked. The figure is the report's comparison.png over
the merged trials (every evaluated epoch of every trial in (unlearn quality, utility), each method's front;
each model's sampling and prefill worst case); the table (printed, markdown) gives each trial's final
scores, the run it comes from, and the model its side effects were measured against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pmc_pipeline.eval.plots import draw_method_comparison
from pmc_pipeline.recipes.tofu_real_report import curves_start, epoch_fronts
from pmc_pipeline.recipes.tofu_real_seeds import method_of

PAPER_ORDER = ("pmc", "ga", "gd", "idk", "dpo", "npo", "simnpo")  # the methods as the paper lists them
SAME_START = ("forget", "forget_paraphrased", "retain", "real_authors", "world_facts", "unlearn_quality",
              "sampling_attack", "prefill_attack")
ROWS = [("unlearn quality", "unlearn_quality", "{:.1f}"), ("utility", "utility", "{:.1f}"),
        ("forget recall", "forget", "{:.3f}"), ("retain recall", "retain", "{:.3f}"),
        ("sampling attack", "sampling_attack", "{:.3f}"), ("prefill attack", "prefill_attack", "{:.3f}"),
        ("MC: true answer least likely", "mc_least_likely", "{:.0%}"),
        ("TOFU forget quality", "forget_quality", "{:.3g}"), ("TOFU model utility", "model_utility", "{:.3f}"),
        ("real_authors vs fine-tuned", "real_authors_change", "{:+.0%}"),
        ("world_facts vs fine-tuned", "world_facts_change", "{:+.0%}"),
        ("side effects: mean probability change", "side_effect_mean_change", "{:+.4f}")]


def merge(paths: list[Path]) -> tuple[dict, dict, dict, dict]:
    """Columns, curves, each trial's method and each model's source file (a later run's model wins)."""
    columns, curves, families, source, start = {}, {}, {}, {}, None
    for path in paths:
        report = json.loads(path.read_text())
        first = {key: report["columns"]["finetuned"][key] for key in SAME_START}
        if start is not None and first != start:
            raise SystemExit(f"{path}: its fine-tuned model's scores differ from the first run's; not one starting point")
        start = first
        against = report["settings"].get("side_effects_against", "finetuned")
        for name, column in report["columns"].items():
            columns[name], source[name] = {**column, "side_effects_against": against}, path
        for trial, points in report["curves"].items():
            curves[trial] = points
            families[trial] = method_of(report["settings"]["methods"].get(trial))
    return columns, curves, families, source


def main(out: Path, paths: list[Path]) -> None:
    columns, curves, families, source = merge(paths)
    order = list(dict.fromkeys([*PAPER_ORDER, *families.values()]))
    trials = sorted(curves, key=lambda t: (order.index(families[t]), t))  # by method, then name
    draw_method_comparison(epoch_fronts({t: curves[t] for t in trials}, families), curves_start(curves),
                           {n: (columns[n]["sampling_attack"], columns[n]["prefill_attack"]) for n in trials}, out)
    names = ["finetuned", *trials]
    print("| metric | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for label, key, fmt in ROWS:
        print(f"| {label} | " + " | ".join("-" if columns[n].get(key) is None else fmt.format(columns[n][key])
                                          for n in names) + " |")
    print("| side effects against | " + " | ".join("-" if n == "finetuned" else columns[n]["side_effects_against"]
                                                    for n in names) + " |")
    print("| from | " + " | ".join(str(paths.index(source[n]) + 1) for n in names) + " |")
    print(f"\nwritten: {out}; runs: " + ", ".join(f"{i + 1} {p}" for i, p in enumerate(paths)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
