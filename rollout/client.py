"""RolloutClient: synchronous calls on one or more rollout engine actors, as one engine.

What the PMC loop's `Rollout` protocol expects; the driver holds one per job (pmc_pipeline/runtime/session.py
starts the engines and hands out the client).
"""

from __future__ import annotations

import logging
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

    def __init__(self, actors: Any, call_timeout_s: float | None = None, workers_per_engine: int = 1):
        """`workers_per_engine`: vLLM workers of each engine (its tensor-parallel size): each holds a rank
        of the weight-transfer group."""
        self.actors = list(actors) if isinstance(actors, (list, tuple)) else [actors]
        self.call_timeout_s = call_timeout_s
        self.workers_per_engine = workers_per_engine

    def __getstate__(self) -> dict[str, Any]:
        # What travels to trainer rank 0, which drives the engines during a push: handles and settings only
        return {"actors": self.actors, "call_timeout_s": self.call_timeout_s,
                "workers_per_engine": self.workers_per_engine}

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

    def answer_logprob_ranks(self, sequences):
        return self._split("answer_logprob_ranks", sequences)

    # -- vLLM's weight-sync client protocol (VLLMWeightSyncClient): trainer rank 0 calls these --------
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """Every engine joins the transfer group. vLLM numbers a worker `rank_offset` + its rank within
        its engine, so engines that are separate `LLM`s would all take the same ranks: engine i's
        offset moves past the workers of engines 0..i-1."""
        offset = init_info.get("rank_offset", 1)
        refs = [actor.init_weight_transfer_engine.remote(
                    {**init_info, "rank_offset": offset + i * self.workers_per_engine})
                for i, actor in enumerate(self.actors)]
        wait_engines(refs, "init_weight_transfer_engine", self.call_timeout_s)

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._all("update_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", weight_version)

    def sleep(self) -> None:
        """Colocated on GPUs: the engines free their memory while the trainer trains (else no-op)."""
        self._all("sleep")

    def share_cores(self, sharing: bool) -> None:
        """On CPU: the engines take one thread each while the trainer trains beside them (else no-op)."""
        self._all("share_cores", sharing)

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
