"""Progress reporting (no engine): plain lines with counts and an ETA when output is not a terminal,
at most one per LINE_EVERY_S of a (fake) clock; an engine client whose long calls report pieces
without changing what they return; a heartbeat for phases without counts."""

from __future__ import annotations

import logging
import threading

from pmc_pipeline.runtime import progress
from pmc_pipeline.runtime.progress import Heartbeat, Progress, ProgressRollout


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_most_every_ten_seconds_with_counts_and_what_is_left(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="pmc_pipeline.progress"):
        bar = Progress("evaluation: greedy answers", 400, "prompts", clock=clock, terminal=False)
        for step in range(8):  # 50 prompts every 4 s
            clock.now += 4
            bar.advance(50)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["evaluation: greedy answers: 150/400 prompts, 12 s, about 20 s left",
                     "evaluation: greedy answers: 300/400 prompts, 24 s, about 8 s left",
                     "evaluation: greedy answers: 400/400 prompts, 32 s"]


class SeededClient:
    """Answers prompt i of a call with (prompt, seed + i*n): what vLLM's per-request seeds make of it."""

    def __init__(self):
        self.calls = []

    def sample(self, prompt_ids, n, temperature, top_p, max_tokens, seed=None):
        self.calls.append(len(prompt_ids))
        return [(p, seed + i * n) for i, p in enumerate(prompt_ids)]

    def greedy(self, prompt_ids, max_tokens):
        self.calls.append(len(prompt_ids))
        return [p * 2 for p in prompt_ids]

    def stats(self):
        return "passed through"


def test_a_long_call_goes_in_pieces_with_the_same_seeds_and_results(caplog):
    prompts = list(range(100))
    whole = SeededClient().sample(prompts, 4, 1.0, 1.0, 8, seed=1000)
    client = SeededClient()
    rollout = ProgressRollout(client)
    with caplog.at_level(logging.INFO, logger="pmc_pipeline.progress"):
        assert rollout.phase("sampling attack").sample(prompts, 4, 1.0, 1.0, 8, seed=1000) == whole
    assert client.calls == [16] * 6 + [4]  # pieces of max(16, 100/10) prompts
    assert caplog.records[-1].getMessage().startswith("sampling attack: 100/100 prompts")
    assert rollout.greedy([1, 2], 8) == [2, 4] and rollout.stats() == "passed through"


def test_a_heartbeat_says_how_long_and_how_far(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.01)
    seen = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            seen.set()

    logger = logging.getLogger("pmc_pipeline.progress")
    watch = Watch()
    logger.addHandler(watch)
    try:
        with caplog.at_level(logging.INFO, logger="pmc_pipeline.progress"):
            with Heartbeat("starting 2 vLLM rollout engine(s)", lambda: "1/2 ready"):
                assert seen.wait(timeout=30)
    finally:
        logger.removeHandler(watch)
    message = caplog.records[0].getMessage()
    assert message.startswith("starting 2 vLLM rollout engine(s): still running after ") and message.endswith(", 1/2 ready")
