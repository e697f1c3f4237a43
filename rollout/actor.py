"""Start the RolloutWorker as a Ray actor and wait for its engine, with a clear error if it fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rollout.worker import RolloutSettings, RolloutWorker

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def _actor_env(settings: RolloutSettings) -> dict[str, str]:
    """Environment of the actor process: set explicitly so the cluster's defaults cannot override it."""
    python_path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {
        "PYTHONPATH": python_path,  # vLLM imports the worker extension by name (rollout.weight_sync)
        "VLLM_CPU_KVCACHE_SPACE": settings.kv_cache_env,  # ignored on GPUs
    }
    if "RAY_AUTH_MODE" in os.environ:  # vLLM may join this Ray cluster (multi-GPU executor)
        env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    return env


def start_rollout_actor(settings: RolloutSettings, use_gpus: bool, name: str | None = None) -> Any:
    """Create the rollout actor (returns at once; call `wait_until_ready` before using it).

    On GPUs it holds `tensor_parallel_size` GPUs; on CPU it asks for no CPU slot, so it time-shares
    the cores with the trainer (the loop runs the two roles one after the other).
    """
    import ray

    resources = {"num_gpus": settings.tensor_parallel_size} if use_gpus else {"num_cpus": 0}
    # No restarts: a restarted engine would silently serve the original weights, not the pushed ones.
    options: dict[str, Any] = {"runtime_env": {"env_vars": _actor_env(settings)}, "max_restarts": 0}
    if name is not None:
        options["name"] = name
    return ray.remote(RolloutWorker).options(**resources, **options).remote(settings)


def wait_until_ready(actor: Any, timeout_s: float = 900.0) -> None:
    """Block until the actor's engine is up; raise RuntimeError naming the cause if it is not."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    try:
        ray.get(actor.ready.remote(), timeout=timeout_s)
    except GetTimeoutError as exc:
        raise RuntimeError(f"the vLLM rollout actor did not start within {timeout_s:.0f} s") from exc
    except RayError as exc:
        # Ray's message is the whole remote traceback; its last line names the cause.
        lines = [line for line in str(exc).splitlines() if line.strip()]
        cause = lines[-1].strip() if lines else type(exc).__name__
        raise RuntimeError(f"the vLLM rollout actor failed to start: {cause}\n\n{exc}") from exc


def stop_rollout_actor(actor: Any) -> None:
    """Shut the engine down, then end the actor process."""
    import ray
    from ray.exceptions import RayError

    try:
        ray.get(actor.close.remote(), timeout=120)
    except RayError:
        pass  # the actor is already dead or stuck: killing it below frees everything anyway
    ray.kill(actor)
