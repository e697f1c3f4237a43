"""The Ray side of the driver: one Ray instance, the rollout actor and trainer groups.

A session outlives a single job so the demo (fine-tune, evaluate, unlearn, evaluate) and a test
session start Ray and the vLLM engine once; a later job with a model of the same architecture gets
the running engine with the new checkpoint's weights loaded in place.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pmc_pipeline.models import architecture_signature

log = logging.getLogger(__name__)


def init_ray(ray_address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to RAY_ADDRESS / `ray_address` when set, else start a local instance. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only instance
    ray.init(
        address="local",
        num_cpus=num_cpus or max(os.cpu_count() or 1, 8),  # logical slots; CPU actors ask for 0
        include_dashboard=False,
        log_to_driver=True,
    )
    return True


class RolloutClient:
    """Synchronous calls on the rollout actor (what the loop's `Rollout` protocol expects)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def sample(self, prompt_ids, n, temperature, top_p, max_tokens, seed=None):
        import ray

        return ray.get(self.actor.sample.remote(prompt_ids, n, temperature, top_p, max_tokens, seed))

    def greedy(self, prompt_ids, max_tokens):
        import ray

        return ray.get(self.actor.greedy.remote(prompt_ids, max_tokens))

    def load_weights(self, weights_ref) -> dict:
        """`weights_ref` is an object ref from the trainer: the bytes go actor to actor, not via the driver."""
        import ray

        return ray.get(self.actor.load_weights.remote(weights_ref))

    def load_checkpoint(self, model_dir: str) -> dict:
        import ray

        return ray.get(self.actor.load_checkpoint.remote(model_dir))

    def stats(self) -> dict:
        import ray

        return ray.get(self.actor.stats.remote())


class PipelineSession:
    """Owns Ray and the long-lived rollout actor; hands out trainer groups."""

    def __init__(self, ray_address: str | None = None, num_cpus: int | None = None, use_gpus: bool = False,
                 rollout_actor: Any = None):
        self.use_gpus = use_gpus
        self._started_ray = init_ray(ray_address, num_cpus)
        self._rollout_actor = rollout_actor
        self._owns_rollout = rollout_actor is None
        self._rollout_key: tuple | None = None

    def rollout(self, model_source: str, settings: Any) -> RolloutClient:
        """A running engine holding `model_source`'s weights (started, reused or restarted)."""
        import ray

        if self._rollout_actor is not None and not self._owns_rollout:
            return self._load_into_running_engine(model_source)  # an engine lent to us: same architecture
        key = (architecture_signature(model_source), settings.max_model_len, settings.dtype,
               settings.tensor_parallel_size)
        if self._rollout_actor is not None and key == self._rollout_key:
            return self._load_into_running_engine(model_source)
        if self._rollout_actor is not None:
            ray.kill(self._rollout_actor)
        from rollout.actor import start_rollout_actor

        log.info("starting the vLLM rollout engine on %s", model_source)
        self._rollout_actor = start_rollout_actor(settings, use_gpus=self.use_gpus)
        self._owns_rollout, self._rollout_key = True, key
        return RolloutClient(self._rollout_actor)

    def _load_into_running_engine(self, model_source: str) -> RolloutClient:
        client = RolloutClient(self._rollout_actor)
        client.load_checkpoint(model_source)
        return client

    def trainer(self, settings: Any, world_size: int) -> Any:
        from trainer.group import TrainerGroup

        return TrainerGroup(settings, world_size, use_gpus=self.use_gpus)

    def close(self) -> None:
        import ray

        if self._owns_rollout and self._rollout_actor is not None:
            try:
                ray.get(self._rollout_actor.close.remote(), timeout=60)
            except Exception:  # the engine may already be gone; killing the actor is enough
                pass
            ray.kill(self._rollout_actor)
        self._rollout_actor = None
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> "PipelineSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
