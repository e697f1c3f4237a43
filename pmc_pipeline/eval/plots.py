"""`pmc plot <run dir> [<run dir> ...] [out=DIR]`: unlearning curves as PNG files (matplotlib, Agg).

Reads each run's metrics.jsonl lines that carry greedy evaluation scores (`pmc unlearn` with
evaluation.eval_every=K) and the run's eval_before.json (epoch 0, the model before unlearning):

    curves_epoch.png   unlearn quality and utility against epoch
    curves_time.png    the same against wall-clock seconds of unlearning (evaluation time excluded)
    pareto.png         utility against unlearn quality, one line per run (the paper's Pareto view)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pmc_pipeline.errors import PMCError
from pmc_pipeline.runtime.atomic import atomic_dir, require_new_dir

UQ, UTILITY = "eval_unlearn_quality", "eval_utility"


@dataclass
class RunCurve:
    name: str
    epochs: list[int]
    seconds: list[float]
    unlearn_quality: list[float | None]
    utility: list[float | None]


def read_run(run_dir: str | Path) -> RunCurve:
    """The evaluated epochs of one run (epoch 0 from eval_before.json when present)."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise PMCError(f"{run}: no metrics.jsonl (is it a `pmc unlearn` run dir?)")
    points = []
    before = run / "eval_before.json"
    if before.is_file():
        points.append({"epoch": 0, "elapsed_seconds": 0.0, **json.loads(before.read_text())})
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise PMCError(f"{metrics}: line {number} is not JSON") from None
        if record.get(UQ) is not None or record.get(UTILITY) is not None:
            points.append(record)
    if not points:
        raise PMCError(f"{metrics}: no evaluation scores; run `pmc unlearn ... evaluation.eval_every=K` to log them")
    return RunCurve(
        name=run.name,
        epochs=[int(p["epoch"]) for p in points],
        seconds=[float(p.get("elapsed_seconds", 0.0)) for p in points],
        unlearn_quality=[p.get(UQ) for p in points],
        utility=[p.get(UTILITY) for p in points],
    )


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Draw the three figures for the given runs into a new folder out_dir; returns the files written."""
    if not run_dirs:
        raise PMCError("no run dir given")
    out = require_new_dir(out_dir, "out")
    runs = [read_run(r) for r in run_dirs]  # bad input fails before matplotlib loads
    with atomic_dir(out) as tmp:
        _draw(runs, tmp)
    return [out / name for name in FIGURES]


FIGURES = ("curves_epoch.png", "curves_time.png", "pareto.png")


def _draw(runs: list[RunCurve], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_name, label, filename in (("epochs", "epoch", FIGURES[0]),
                                    ("seconds", "wall-clock seconds of unlearning", FIGURES[1])):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for run in runs:
            x = getattr(run, x_name)
            axes[0].plot(x, run.unlearn_quality, marker="o", label=run.name)
            axes[1].plot(x, run.utility, marker="o", label=run.name)
        for ax, title in zip(axes, ("unlearn quality (0-100)", "utility (0-100)")):
            ax.set_xlabel(label)
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        fig.savefig(out / filename, dpi=120, bbox_inches="tight")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for run in runs:
        line, = ax.plot(run.unlearn_quality, run.utility, marker="o", alpha=0.7, label=run.name)
        ax.scatter(run.unlearn_quality[-1:], run.utility[-1:], s=90, color=line.get_color(), edgecolor="black",
                   zorder=3)
    ax.set_xlabel("unlearn quality (0-100)")
    ax.set_ylabel("utility (0-100)")
    ax.set_title("utility vs unlearn quality (last epoch outlined)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(out / FIGURES[2], dpi=120, bbox_inches="tight")
    plt.close(fig)
