"""What one chunk of a PMC epoch is made of: the engine side (samples, rewards, picks) and the
trainer side (winners paired with retain examples as global batches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pmc_pipeline.method.selection import Selection
from trainer.records import TrainExample


class RetainStream:
    """Retain (or keep) examples in random order without replacement, reshuffled when used up; one per
    epoch."""

    def __init__(self, examples: Sequence[TrainExample], rng: np.random.Generator):
        self.examples, self.rng = list(examples), rng
        self.order, self.cursor = self.rng.permutation(len(self.examples)), 0

    def next(self) -> TrainExample | None:
        if not self.examples:
            return None
        if self.cursor == len(self.order):
            self.order, self.cursor = self.rng.permutation(len(self.examples)), 0
        self.cursor += 1
        return self.examples[self.order[self.cursor - 1]]


def pair_with_retain(forget: Sequence[TrainExample], retain: RetainStream, batch_size: int,
                     aligned: Sequence[TrainExample] | None = None,
                     keep: RetainStream | None = None) -> list[list[TrainExample]]:
    """Global batches of `batch_size` forget examples in the given order, each paired with the next
    retain example (then the next keep example when `keep` is given, then `aligned[i]` when given).

    Forget and retain examples alternate inside a batch so that every data-parallel rank (which takes
    every world_size-th example) gets both kinds.
    """
    batches = []
    for start in range(0, len(forget), batch_size):
        batch: list[TrainExample] = []
        for index in range(start, min(start + batch_size, len(forget))):
            batch.append(forget[index])
            for stream in (retain, keep):
                paired = stream.next() if stream is not None else None
                if paired is not None:
                    batch.append(paired)
            if aligned is not None:
                batch.append(aligned[index])
        batches.append(batch)
    return batches


@dataclass
class ChunkSamples:
    """The engine side of one chunk: samples of the questions that needed them, scored and picked."""

    index: int
    questions: list[int]  # the chunk, in epoch order
    sampled: list[int]  # those sent to the engine (PMC-fast: the unconverged ones)
    texts: list[list[str]]
    tokens: int
    rewards: np.ndarray  # [sampled, n]
    chosen: Selection
    spans: list[tuple[str, float, float]]  # (phase, start, end) on time.perf_counter's clock


@dataclass
class ChunkPlan:
    """What the trainer gets for one chunk."""

    batches: list[list[TrainExample]]
    role_weights: dict[str, float]
    trained: list[int]  # questions with a winner (PMC-fast: with a cached answer)
    gamma: float  # mean reward of the trained winners
    align_weight: float
