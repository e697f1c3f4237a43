"""Benchmark figures: repeated measurements summarised as min / median / max, a JSON report, a table."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Figure:
    """One measured quantity; `values` holds one number per repeat."""

    name: str
    unit: str
    values: list[float]
    note: str = ""

    def summary(self) -> dict[str, Any]:
        return {"unit": self.unit, "min": min(self.values), "median": statistics.median(self.values),
                "max": max(self.values), "values": list(self.values), "note": self.note}


@dataclass
class BenchReport:
    """Everything one bench run found: figures, correctness checks, a per-phase profile, notes."""

    figures: dict[str, Figure] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, unit: str, values: list[float], note: str = "") -> Figure:
        if not values:
            raise ValueError(f"figure {name} has no measurements")
        figure = Figure(name, unit, [float(v) for v in values], note)
        self.figures[name] = figure
        return figure

    def add_ratio(self, name: str, numerator: str, denominator: str, note: str = "") -> Figure:
        """Per-repeat ratio of two figures measured in the same repeats (e.g. a speed-up)."""
        top, bottom = self.figures[numerator].values, self.figures[denominator].values
        return self.add(name, "x", [a / b for a, b in zip(top, bottom)], note)

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "figures": {k: f.summary() for k, f in self.figures.items()},
                "checks": self.checks, "profile": self.profile}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call, and its result (garbage left by earlier work is collected first,
    so one side of a comparison does not pay for the other's)."""
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown_table(report: BenchReport) -> str:
    lines = ["| figure | unit | min | median | max | repeats |", "|---|---|---|---|---|---|"]
    for figure in report.figures.values():
        s = figure.summary()
        lines.append(f"| {figure.name} | {figure.unit} | {_fmt(s['min'])} | {_fmt(s['median'])} | "
                     f"{_fmt(s['max'])} | {len(figure.values)} |")
    return "\n".join(lines)
