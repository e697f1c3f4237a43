"""The knowledge next to the forget target (real_authors, world_facts), cut once into two halves by a
fixed seed: anything that tunes, selects or trains on neighbour questions may read the *selection*
half only, and results are reported on the *report* half, so a setting chosen for keeping the
neighbours is not also judged on the questions it was chosen on (`evaluation.neighbour_half`)."""

from __future__ import annotations

import zlib

import numpy as np

HALVES = ("all", "selection", "report")
NEIGHBOUR_SPLITS = ("real_authors", "world_facts")


def half_rows(split: str, rows: int, half: str, seed: int) -> list[int] | None:
    """The row indices (ascending) of `split`'s `half`: a permutation drawn from (seed, the split's name);
    its first ceil(rows / 2) rows are the selection half, the others the report half. None for "all"."""
    if half not in HALVES:
        raise ValueError(f"half={half!r}: choose one of {', '.join(HALVES)}")
    if half == "all":
        return None
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(rows)
    cut = (rows + 1) // 2
    return sorted(int(i) for i in (order[:cut] if half == "selection" else order[cut:]))
