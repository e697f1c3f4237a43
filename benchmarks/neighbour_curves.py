"""The keep-the-neighbours settings of several `pmc tofu-real` runs in one figure and one table.

    .venv/bin/python benchmarks/neighbour_curves.py OUT.png RESULTS.json [RESULTS.json ...]

Each RESULTS.json is a tofu-real report (results.json) judged on the report halves. Runs may be merged
only when they start from the same fine-tuned model: its greedy scores (what the figure reads) must be
equal in every run, which is checked (likelihood metrics may differ in the 7th digit between machines).
The figure puts every evaluated epoch of every method at (unlearn quality, real_authors /
world_facts change against the fine-tuned model), one line per method, the issue's target shaded
(quality >= 95 with neither split losing more than 10%: a gain is no lost knowledge). The table
(printed, markdown) holds every evaluated epoch of each method and whether it meets the target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGET_QUALITY, TARGET_CHANGE = 95.0, 0.10
SPLITS = ("real_authors", "world_facts")
GREEDY = ("forget", "forget_paraphrased", "retain", *SPLITS, "unlearn_quality")


def load_runs(paths: list[Path]) -> tuple[dict, dict]:
    """The fine-tuned column and every method's curve, from runs that share that column."""
    finetuned, curves = None, {}
    for path in paths:
        report = json.loads(path.read_text())
        start = {split: report["columns"]["finetuned"][split] for split in GREEDY}
        if finetuned is not None and start != finetuned:
            raise SystemExit(f"{path}: its fine-tuned model's greedy scores differ from the first run's; not one "
                             f"starting point")
        finetuned = start
        for method, points in report["curves"].items():
            curves[method] = points
    return finetuned, curves


def change(point: dict, split: str, finetuned: dict) -> float:
    return point[f"eval_{split}"] / finetuned[split] - 1.0


def draw(finetuned: dict, curves: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    changes = [change(p, split, finetuned) for split in SPLITS for points in curves.values() for p in points]
    axes[0].set_ylim(min(changes) - 0.05, max(changes) + 0.05)
    for ax, split in zip(axes, SPLITS):
        ax.fill_between([TARGET_QUALITY, 100.0], -TARGET_CHANGE, max(changes) + 0.05, color="0.9", zorder=0)
        ax.axhline(0.0, color="0.7", linewidth=0.8)
        for method, points in curves.items():
            x = [p["eval_unlearn_quality"] for p in points]
            y = [change(p, split, finetuned) for p in points]
            ax.plot(x, y, marker="o", label=method)
            ax.annotate(str(points[-1]["epoch"]), (x[-1], y[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("unlearn quality (0-100), every evaluated epoch")
        ax.set_title(f"{split} vs fine-tuned (report half); shaded: quality >= {TARGET_QUALITY:.0f}, "
                     f"at most {TARGET_CHANGE:.0%} lost", fontsize=9)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[0].set_ylabel("recall change against the fine-tuned model")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.rename(out)


def table(finetuned: dict, curves: dict) -> str:
    rows = ["| method | epoch | quality | forget | retain | real_authors vs fine-tuned | world_facts vs fine-tuned | "
            "meets the target |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for method, points in curves.items():
        for p in points[1:]:  # epoch 0 is the fine-tuned model
            changes = [change(p, split, finetuned) for split in SPLITS]
            inside = p["eval_unlearn_quality"] >= TARGET_QUALITY and all(c >= -TARGET_CHANGE for c in changes)
            rows.append(f"| {method} | {p['epoch']} | {p['eval_unlearn_quality']:.1f} | {p['eval_forget']:.3f} | "
                        f"{p['eval_retain_short']:.3f} | {changes[0]:+.0%} | {changes[1]:+.0%} | "
                        f"{'yes' if inside else 'no'} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, paths = Path(argv[0]), [Path(p) for p in argv[1:]]
    finetuned, curves = load_runs(paths)
    draw(finetuned, curves, out)
    print(table(finetuned, curves))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
