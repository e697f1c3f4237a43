"""The folder a `pmc sweep` owns: its marker, and the table and Pareto plot of its trials.

    read_marker    sweep.yaml, written before any trial, names the base config, grid and seeds; a
                   folder without it that is not empty, or one of another sweep, is refused
    write_summary  sweep.md and sweep.json (settings, unlearn quality, utility, unlearning seconds, status,
                   run dir) and pareto.png (utility against unlearn quality, the dominating trials marked),
                   each staged under a hidden name and renamed; sweep.yaml keeps their hashes, so a file
                   the sweep did not write is never replaced
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pmc_pipeline.errors import PMCError
from pmc_pipeline.runtime.atomic import atomic_write_text
from pmc_pipeline.schema import SweepConfig

SUMMARY_FILES = ("sweep.md", "sweep.json", "pareto.png")
# written first: what the sweep is and the hashes of the summary files it wrote; no marker, no sweep's folder
MARKER = "sweep.yaml"


def sweep_identity(config: str, sweep: SweepConfig, grid: list[str]) -> dict[str, Any]:
    """What makes a sweep the same sweep when run again (max_concurrent may change)."""
    return {"config": config, "grid": list(grid), "seeds": sweep.seeds}


def read_marker(sweep_dir: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """sweep_dir's marker when it holds this same sweep, None when it is new or empty; anything else (a
    folder of other files, another sweep, a summary file the sweep did not write) is refused."""
    from omegaconf import OmegaConf

    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise PMCError(f"sweep_dir={sweep_dir} is a file; give a new folder")
    marker = sweep_dir / MARKER
    if not marker.is_file():
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
            raise PMCError(f"sweep_dir={sweep_dir} already exists, is not empty and is not a pmc sweep's folder "
                           f"(no {MARKER}); choose a new sweep_dir (pmc never overwrites or deletes what is there)")
        return None
    saved = OmegaConf.to_container(OmegaConf.load(marker), resolve=True)
    changed = sorted(key for key in identity if saved.get(key) != identity[key])
    if changed:
        raise PMCError(f"sweep_dir={sweep_dir} holds another sweep ({', '.join(changed)} differ; see {marker}); "
                       "choose a new sweep_dir, or run that sweep's own command")
    for name in SUMMARY_FILES:
        if (sweep_dir / name).is_file() and _sha256(sweep_dir / name) not in saved["products"].get(name, []):
            raise PMCError(f"{sweep_dir / name} was not written by this sweep (or was changed since); move it away, "
                           "then run the sweep again (it writes a new one)")
    return saved


def write_marker(sweep_dir: Path, content: dict[str, Any]) -> None:
    from omegaconf import OmegaConf

    atomic_write_text(sweep_dir / MARKER, OmegaConf.to_yaml(OmegaConf.create(content)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trial_scores(run_dir: Path) -> dict[str, Any]:
    """A trial's last evaluated unlearn quality and utility, its epochs and unlearning seconds."""
    from pmc_pipeline.eval.plots import UQ, UTILITY

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    scored = [line for line in lines if line.get(UQ) is not None]
    return {"unlearn_quality": scored[-1][UQ] if scored else None,
            "utility": scored[-1].get(UTILITY) if scored else None,
            "epochs": lines[-1]["epoch"] if lines else 0,
            "seconds": lines[-1].get("elapsed_seconds") if lines else None}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (unlearn quality, utility): True when no other point is at least as good in both and
    better in one (both are maximised)."""
    return [not any(a >= x and b >= y and (a > x or b > y) for a, b in points) for x, y in points]


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]], identity: dict[str, Any]) -> list[dict[str, Any]]:
    """sweep.json, sweep.md and pareto.png from the trials' rows (marked `pareto`); returns the rows.

    Each file is staged under a hidden name, its hash recorded in the marker, then renamed into place:
    a file there that the sweep did not write (its hash unknown) is refused, never replaced."""
    from pmc_pipeline.eval.plots import draw_trials_pareto

    scored = [r for r in rows if r["unlearn_quality"] is not None and r["utility"] is not None]
    for row, dominating in zip(scored, pareto_front([(r["unlearn_quality"], r["utility"]) for r in scored])):
        row["pareto"] = dominating
    staged = {name: sweep_dir / f".{name}.staged{Path(name).suffix}" for name in SUMMARY_FILES}
    try:
        staged["sweep.json"].write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        staged["sweep.md"].write_text(format_table(rows) + "\n", encoding="utf-8")
        draw_trials_pareto([(r["trial"], r["unlearn_quality"], r["utility"], r["pareto"]) for r in scored],
                           staged["pareto.png"])
        marker = read_marker(sweep_dir, identity)  # again: a file may have appeared while the trials ran
        new = {name: _sha256(path) for name, path in staged.items()}
        # the old and new hashes both count until the renames are done, so a crash between them refuses nothing
        write_marker(sweep_dir, {**marker, "products": {n: [*marker["products"].get(n, []), h] for n, h in new.items()}})
        for name, path in staged.items():
            os.replace(path, sweep_dir / name)
        write_marker(sweep_dir, {**marker, "products": {n: [h] for n, h in new.items()}})
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def number(value: Any) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = ["| trial | settings | unlearn quality | utility | Pareto | epochs | unlearning s | status | run dir |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {' '.join(r['settings']) or '(base config)'} | {number(r['unlearn_quality'])} "
                     f"| {number(r['utility'])} | {'yes' if r.get('pareto') else ''} | {r['epochs']} "
                     f"| {number(r['seconds'])} | {r['status']} | {r['run_dir']} |")
    return "\n".join(lines)
