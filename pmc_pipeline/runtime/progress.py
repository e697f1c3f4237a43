"""Visible progress for long phases: a tqdm bar on a terminal, plain log lines elsewhere (CI, job logs).

    Progress    counts with an ETA: a bar when stderr is a terminal, else a line at most every
                LINE_EVERY_S seconds and one at the end
    Heartbeat   a phase without counts (an engine starting): a line every LINE_EVERY_S seconds
    ProgressRollout   an engine client whose calls go in pieces, so one long vLLM call reports counts
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import Any, Callable, Sequence

log = logging.getLogger("pmc_pipeline.progress")
LINE_EVERY_S = 10.0


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s'."""
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """`advance(n)` as work gets done; `close()` at the end (or use it as a context manager)."""

    def __init__(self, label: str, total: int, unit: str, clock: Callable[[], float] = time.monotonic,
                 terminal: bool | None = None):
        self.label, self.total, self.unit, self.clock = label, total, unit, clock
        self.done, self.started = 0, clock()
        self.last_line = self.started
        self.bar = None
        if sys.stderr.isatty() if terminal is None else terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=f" {unit}", leave=False, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = self.clock() - self.started
        text = f"{self.label}: {self.done}/{self.total} {self.unit}, {duration(elapsed)}"
        if 0 < self.done < self.total:
            text += f", about {duration(elapsed / self.done * (self.total - self.done))} left"
        return text

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.clock() - self.last_line >= LINE_EVERY_S and self.done < self.total:
            self.last_line = self.clock()
            log.info("%s", self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        log.info("%s", self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Heartbeat:
    """A line every LINE_EVERY_S seconds while a phase without counts runs: `with Heartbeat("..."):`."""

    def __init__(self, label: str, status: Callable[[], str] | None = None):
        self.label, self.status = label, status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pmc-heartbeat", daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(LINE_EVERY_S):
            extra = f", {self.status()}" if self.status else ""
            log.info("%s: still running after %s%s", self.label, duration(time.monotonic() - started), extra)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class ProgressRollout:
    """An engine client (`RolloutClient`) whose sample / greedy / prompt log-prob calls go in about
    PIECES pieces of prompts, each counted in a Progress named by the current `phase(...)`. Sampling
    seeds are kept (piece p starts at seed + start * n, as the client does across engines), so the
    samples are those of one call; everything else is passed through."""

    PIECES = 10
    MIN_PIECE = 16  # prompts: smaller pieces would cost the engine its batching

    def __init__(self, client: Any):
        self.client = client
        self.label = "engine"

    def phase(self, label: str) -> "ProgressRollout":
        self.label = label
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def _pieces(self, prompt_ids: Sequence[Any]) -> list[tuple[int, list[Any]]]:
        size = max(self.MIN_PIECE, math.ceil(len(prompt_ids) / self.PIECES))
        return [(start, list(prompt_ids[start:start + size])) for start in range(0, len(prompt_ids), size)]

    def _run(self, prompt_ids: Sequence[Any], call: Callable[[int, list[Any]], list[Any]]) -> list[Any]:
        results: list[Any] = []
        with Progress(self.label, len(prompt_ids), "prompts") as progress:
            for start, piece in self._pieces(prompt_ids):
                results += call(start, piece)
                progress.advance(len(piece))
        return results

    def sample(self, prompt_ids, n, temperature, top_p, max_tokens, seed=None):
        return self._run(prompt_ids, lambda start, piece: self.client.sample(
            piece, n, temperature, top_p, max_tokens, None if seed is None else seed + start * n))

    def greedy(self, prompt_ids, max_tokens):
        return self._run(prompt_ids, lambda start, piece: self.client.greedy(piece, max_tokens))

    def prompt_logprobs(self, prompt_ids):
        return self._run(prompt_ids, lambda start, piece: self.client.prompt_logprobs(piece))

    def answer_logprob_ranks(self, sequences):
        return self._run(sequences, lambda start, piece: self.client.answer_logprob_ranks(piece))
