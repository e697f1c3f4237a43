"""RolloutClient: synchronous calls on one or more rollout engine actors, as one engine.

What the PMC loop's `Rollout` protocol expects; the driver holds one per job (pmc_pipeline/runtime/session.py
starts the engines and hands out the client).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rollout.actor import RolloutEngineError
from trainer.ray_calls import wait_each

log = logging.getLogger(__name__)


def _chunks(items: list, parts: int) -> list[tuple[int, list]]:
    """`items` cut into at most `parts` contiguous, near-equal pieces, each with its start index."""
    size = -(-len(items) // parts) if items else 0
    return [(i, items[i:i + size]) for i in range(0, len(items), size)] if size else []


def wait_engines(refs: list[Any], method: str, timeout_s: float | None = None) -> list[Any]:
    """Results by engine; the first failure or death, as soon as Ray reports it, names its engine."""
    return wait_each(refs, timeout_s, lambda engine, cause: RolloutEngineError(engine, method, cause))


class RolloutClient:
    """Synchronous calls on one or more rollout engines (what the loop's `Rollout` protocol expects).

    Several engines: the prompt batch is cut into one contiguous piece per engine and the answers are
    put back in order; each piece gets the seed offset it would have had in one batch, so the samples
    do not depend on the number of engines. New weights go to every engine as one object ref.
    """

    def __init__(self, actors: Any, call_timeout_s: float | None = None):
        self.actors = list(actors) if isinstance(actors, (list, tuple)) else [actors]
        self.call_timeout_s = call_timeout_s

    def _split(self, method: str, prompt_ids: list, *args: Any, seed_of=None) -> list:
        pieces = _chunks(list(prompt_ids), len(self.actors))
        refs = [getattr(actor, method).remote(piece, *args, *([seed_of(start)] if seed_of else []))
                for actor, (start, piece) in zip(self.actors, pieces)]
        return [item for part in wait_engines(refs, method, self.call_timeout_s) for item in part]

    def _all(self, method: str, *args: Any) -> list:
        return wait_engines([getattr(a, method).remote(*args) for a in self.actors], method, self.call_timeout_s)

    def sample(self, prompt_ids, n, temperature, top_p, max_tokens, seed=None):
        # the worker gives prompt i of its piece seed + i*n: offset each piece by its start
        return self._split("sample", prompt_ids, n, temperature, top_p, max_tokens,
                           seed_of=lambda start: None if seed is None else seed + start * n)

    def greedy(self, prompt_ids, max_tokens):
        return self._split("greedy", prompt_ids, max_tokens)

    def prompt_logprobs(self, prompt_ids):
        return self._split("prompt_logprobs", prompt_ids)

    def load_weights(self, weights_ref) -> dict:
        """`weights_ref` is an object ref from the trainer: every engine pulls the bytes from the object
        store (actor to actor, not via the driver). Returns the slowest engine's timing and all of them."""
        start = time.perf_counter()
        per_engine = self._all("load_weights", weights_ref)
        seconds = time.perf_counter() - start
        log.info("weight push to %d engine(s): %.2f s (%.1f MB; load per engine %s s)", len(per_engine), seconds,
                 per_engine[0]["bytes"] / 1e6, ", ".join(f"{r['seconds']:.2f}" for r in per_engine))
        return {**per_engine[0], "seconds": seconds, "engines": per_engine}

    def load_checkpoint(self, model_dir: str) -> dict:
        per_engine = self._all("load_checkpoint", model_dir)
        return {**per_engine[0], "engines": per_engine}

    def effective_settings(self) -> list[dict]:
        """What each engine runs with, read back from vLLM (`RolloutWorker.effective_settings`), by engine."""
        return self._all("effective_settings")

    def stats(self) -> dict:
        """Counters summed over the engines."""
        per_engine = self._all("stats")
        return {key: sum(stats[key] for stats in per_engine) for key in per_engine[0]}
