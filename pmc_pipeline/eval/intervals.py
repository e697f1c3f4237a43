"""Percentile-bootstrap intervals over questions, for small evaluation splits (20-117 questions): the
mean of a split's per-question scores, and the relative change of a mean between two models scored on
the same questions (resampled jointly, so the pairing is kept)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000


def mean_interval(values: Sequence[float], level: float = 0.95, resamples: int = RESAMPLES,
                  seed: int = 0) -> tuple[float, float]:
    """The `level` percentile-bootstrap interval of the mean of `values`."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("mean_interval: no values")
    picks = np.random.default_rng(seed).integers(0, data.size, size=(resamples, data.size))
    means = data[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def relative_change_interval(after: Sequence[float], before: Sequence[float], level: float = 0.95,
                             resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The `level` interval of mean(after) / mean(before) - 1, the questions resampled jointly (paired:
    after[i] and before[i] are one question's scores under two models)."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"relative_change_interval: {a.size} and {b.size} scores; one per question each expected")
    picks = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    base = b[picks].mean(axis=1)
    changes = a[picks].mean(axis=1) / np.where(base > 0, base, np.nan) - 1.0
    changes = changes[np.isfinite(changes)]
    tail = (1.0 - level) / 2.0
    return float(np.quantile(changes, tail)), float(np.quantile(changes, 1.0 - tail))
