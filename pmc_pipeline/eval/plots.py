"""`pmc plot <run dir> [<run dir> ...] [out=DIR]`: unlearning curves and epoch timelines as PNG files
(matplotlib, Agg).

Reads each run's metrics.jsonl: the lines that carry greedy evaluation scores (`pmc unlearn` with
evaluation.eval_every=K), the run's eval_before.json (epoch 0, the model before unlearning), and every
epoch's timeline (when the engine sampled and scored, the trainer trained, the weights were pushed):

    curves_epoch.png   unlearn quality and utility against epoch        (runs with evaluation scores)
    curves_time.png    the same against wall-clock seconds of unlearning (evaluation time excluded)
    pareto.png         utility against unlearn quality, one line per run (the paper's Pareto view)
    timeline.png       one row per epoch: engine busy / trainer busy / push (timeline-<run>.png for several runs)

`pmc sweep` draws its trials' final scores with `draw_trials_pareto`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pmc_pipeline.errors import PMCError
from pmc_pipeline.runtime.atomic import atomic_dir, require_new_dir

UQ, UTILITY = "eval_unlearn_quality", "eval_utility"


Span = tuple[str, float, float]  # (phase, start, end), seconds since the epoch started


@dataclass
class RunCurve:
    name: str
    epochs: list[int]
    seconds: list[float]
    unlearn_quality: list[float | None]
    utility: list[float | None]
    timelines: list[tuple[int, list[Span]]]  # (epoch, its spans) for every epoch that logged one


def read_run(run_dir: str | Path) -> RunCurve:
    """The evaluated epochs of one run (epoch 0 from eval_before.json when present) and its timelines."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise PMCError(f"{run}: no metrics.jsonl (is it a `pmc unlearn` run dir?)")
    points, timelines = [], []
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
        if record.get("timeline"):
            timelines.append((int(record["epoch"]), [(str(p), float(a), float(b)) for p, a, b in record["timeline"]]))
    if not points and not timelines:
        raise PMCError(f"{metrics}: no evaluation scores and no epoch timelines; run `pmc unlearn ... "
                       "evaluation.eval_every=K` to log scores")
    return RunCurve(
        name=run.name,
        epochs=[int(p["epoch"]) for p in points],
        seconds=[float(p.get("elapsed_seconds", 0.0)) for p in points],
        unlearn_quality=[p.get(UQ) for p in points],
        utility=[p.get(UTILITY) for p in points],
        timelines=timelines,
    )


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Draw the figures for the given runs into a new folder out_dir; returns the files written."""
    if not run_dirs:
        raise PMCError("no run dir given")
    out = require_new_dir(out_dir, "out")
    runs = [read_run(r) for r in run_dirs]  # bad input fails before matplotlib loads
    names = []
    with atomic_dir(out) as tmp:
        evaluated = [run for run in runs if run.unlearn_quality or run.utility]
        if evaluated:
            _draw_curves(evaluated, tmp)
            names += CURVES
        for run in runs:
            if run.timelines:
                name = "timeline.png" if len(runs) == 1 else f"timeline-{run.name}.png"
                draw_timeline([(f"epoch {epoch}", spans) for epoch, spans in run.timelines], tmp / name,
                              f"{run.name}: what each role did in each epoch")
                names.append(name)
    return [out / name for name in names]


CURVES = ("curves_epoch.png", "curves_time.png", "pareto.png")
# lane and colour of each phase: the engine samples (and the driver scores) in the engine lane
PHASES = {"rollout": ("engine", "tab:blue"), "reward": ("engine", "lightskyblue"),
          "train": ("trainer", "tab:orange"), "weight_push": ("trainer", "tab:red")}
MAX_TIMELINE_ROWS = 40


def draw_timeline(rows: Sequence[tuple[str, Sequence[Span]]], path: Path, title: str) -> None:
    """One row per epoch (label, spans): an engine lane above a trainer lane, seconds since the epoch
    started. More than MAX_TIMELINE_ROWS rows are thinned to evenly spaced ones (the last kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if len(rows) > MAX_TIMELINE_ROWS:
        step = -(-len(rows) // MAX_TIMELINE_ROWS)
        rows = list(rows)[::-1][::step][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.55 * len(rows)))
    for row, (_, spans) in enumerate(rows):
        y = len(rows) - 1 - row
        for phase, start, end in spans:
            lane, colour = PHASES.get(phase, ("engine", "grey"))
            ax.broken_barh([(start, end - start)], (y + (0.5 if lane == "engine" else 0.1), 0.38), color=colour)
    ax.set_yticks([len(rows) - 1 - i + 0.5 for i in range(len(rows))], [label for label, _ in rows])
    ax.set_xlabel("seconds since the epoch started (upper lane: engine, lower lane: trainer)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[Patch(color=c, label=p.replace("_", " ")) for p, (_, c) in PHASES.items()],
              fontsize="small", loc="upper right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _draw_curves(runs: list[RunCurve], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_name, label, filename in (("epochs", "epoch", CURVES[0]),
                                    ("seconds", "wall-clock seconds of unlearning", CURVES[1])):
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
    fig.savefig(out / CURVES[2], dpi=120, bbox_inches="tight")
    plt.close(fig)


def draw_trials_pareto(points: Sequence[tuple[str, float, float, bool]], path: Path) -> None:
    """One dot per (name, unlearn quality, utility, dominating): the dominating trials outlined, named and
    joined by the front (the paper's Figure 3 view of a sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, uq, util, dominating in points:
        ax.scatter([uq], [util], s=80 if dominating else 40, color="tab:red" if dominating else "tab:gray",
                   edgecolor="black" if dominating else "none", zorder=3)
        ax.annotate(name, (uq, util), textcoords="offset points", xytext=(5, 4), fontsize="x-small")
    front = sorted((uq, util) for _, uq, util, dominating in points if dominating)
    if len(front) > 1:
        ax.plot(*zip(*front), color="tab:red", alpha=0.6, zorder=2, label="Pareto front")
        ax.legend(fontsize="small")
    if not points:
        ax.text(0.5, 0.5, "no trial has scores yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("unlearn quality (0-100)")
    ax.set_ylabel("utility (0-100)")
    ax.set_title(f"{len(points)} trial(s): utility vs unlearn quality (dominating ones in red)")
    ax.grid(alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def draw_method_comparison(points: Sequence[dict], start: tuple[float, float] | None,
                           attacks: dict[str, tuple[float | None, float | None]], path: Path) -> None:
    """The paper's Figures 3 and 4 views of a benchmark: left, every evaluated epoch of every trial in
    (unlearn quality, utility) coloured by method, each method's front joined and the overall front
    circled (`points`: tofu_real_report.epoch_fronts'), the starting model a black cross; right, each
    model's sampling and prefill worst-case recall (`attacks`: name -> (sampling, prefill))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(dict.fromkeys(p["method"] for p in points)):
        own = [p for p in points if p["method"] == method]
        left.scatter([p["quality"] for p in own], [p["utility"] for p in own], s=25, color=colours(i % 10),
                     alpha=0.6, label=method)
        front = sorted((p["quality"], p["utility"]) for p in own if p["method_front"])
        left.plot(*zip(*front), color=colours(i % 10), lw=1.5)
    overall = [(p["quality"], p["utility"]) for p in points if p["overall_front"]]
    if overall:
        left.scatter(*zip(*overall), s=110, facecolor="none", edgecolor="black", lw=1.2, label="overall front")
    if start is not None:
        left.scatter([start[0]], [start[1]], marker="x", s=70, color="black", label="start (fine-tuned)")
    if not points:
        left.text(0.5, 0.5, "no evaluated epoch yet", ha="center", va="center", transform=left.transAxes)
    left.set_xlabel("unlearn quality (0-100)")
    left.set_ylabel("utility (0-100)")
    left.set_title("utility vs unlearn quality, every evaluated epoch", fontsize="medium")
    left.grid(alpha=0.3)
    left.legend(fontsize="x-small")
    names = list(attacks)
    x = range(len(names))
    for offset, (label, index) in zip((-0.2, 0.2), (("sampling attack", 0), ("prefill attack", 1))):
        # a model without that attack gets no bar (NaN), not a bar at 0 that would read as no leakage
        right.bar([i + offset for i in x], [float("nan") if attacks[n][index] is None else attacks[n][index]
                                            for n in names], width=0.4, label=label)
    right.set_xticks(list(x), names, rotation=45, ha="right", fontsize="x-small")
    right.set_ylabel("worst-case ROUGE-L recall of the true answer (lower leaks less)")
    right.set_title("leakage under attack, final models", fontsize="medium")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize="x-small")
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
