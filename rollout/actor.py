"""Start the RolloutWorker as a Ray actor and wait for its engine, with a clear error if it fails."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from rollout.config import RolloutConfig
from rollout.worker import RolloutWorker

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def _actor_env(config: RolloutConfig, use_gpus: bool, engines: int) -> dict[str, str]:
    """Environment of the actor process: set explicitly so the cluster's defaults cannot override it."""
    python_path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {
        "PYTHONPATH": python_path,  # vLLM imports the worker extension by name (rollout.weight_sync)
        "VLLM_CPU_KVCACHE_SPACE": config.kv_cache_env,  # ignored on GPUs
    }
    if not use_gpus:  # the engine's torch threads (rollout.cpu_threads); vLLM keeps an explicit value
        env["OMP_NUM_THREADS"] = str(config.engine_cpu_threads(engines))
    if "RAY_AUTH_MODE" in os.environ:  # vLLM may join this Ray cluster (multi-GPU executor)
        env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    return env


def start_rollout_actor(config: RolloutConfig, model_path: str, dtype: str, seed: int, use_gpus: bool,
                        transfer_backend: str, name: str | None = None, placement: dict[str, Any] | None = None,
                        engines: int = 1) -> Any:
    """Create the rollout actor (returns at once; call `wait_until_ready` before using it).

    `placement`: Ray options from `pmc_pipeline.runtime.placement.actor_options` (resources and a placement
    group bundle). Without it the actor holds `tensor_parallel_size` GPUs, or on CPU no CPU slot, so it
    time-shares the cores with the trainer (the loop runs the two roles one after the other).
    `engines`: how many engines share this machine's cores (rollout.cpu_threads auto).
    """
    import ray

    check_vllm_version()
    resources = placement or ({"num_gpus": config.tensor_parallel_size} if use_gpus else {"num_cpus": 0})
    # No restarts: a restarted engine would silently serve the original weights, not the pushed ones.
    options: dict[str, Any] = {"runtime_env": {"env_vars": _actor_env(config, use_gpus, engines)},
                               "max_restarts": 0}
    if name is not None:
        options["name"] = name
    return ray.remote(RolloutWorker).options(**resources, **options).remote(config, model_path, dtype, seed,
                                                                           transfer_backend)


class RolloutEngineError(RuntimeError):
    """A rollout engine actor died or failed a call; the message names the engine."""

    def __init__(self, engine: int, method: str, cause: BaseException) -> None:
        from trainer.ray_calls import failure_message

        super().__init__(failure_message(f"rollout engine {engine}", method, cause))
        self.engine = engine

    def __reduce__(self) -> tuple:
        # Ray carries it out of trainer rank 0 (which drives the engines during a push) by pickling it
        return _rebuilt_engine_error, (str(self), self.engine)


def _rebuilt_engine_error(message: str, engine: int) -> RolloutEngineError:
    error = RolloutEngineError.__new__(RolloutEngineError)
    RuntimeError.__init__(error, message)
    error.engine = engine
    return error


_EXCEPTION_LINE = re.compile(r"^(?:[\w]+\.)*(\w+(?:Error|Exception)\b.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def remote_error_summary(text: str) -> str:
    """One line from a remote traceback (Ray passes only its text): the last `SomeError: message`
    line, without the module path, plus its first detail line (pydantic puts the reason there)."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    found = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    if not found:
        return lines[-1] if lines else ""
    head = _EXCEPTION_LINE.match(lines[found[-1]]).group(1)
    details = [line for line in lines[found[-1] + 1:] if not line.startswith("For further information")]
    return f"{head} ({details[0]})" if details else head


# vLLM changes its internals (worker extensions, reload_weights) between releases: run only the pinned one.
_VLLM_PINS = {"vllm-cpu": "cpu.txt", "vllm": "gpu.txt"}


def pinned_vllm_version(distribution: str) -> str | None:
    """The `distribution==X` pin in requirements/, or None when the requirements files are absent."""
    path = Path(REPO_ROOT) / "requirements" / _VLLM_PINS[distribution]
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.strip().lower() == distribution:
            return version.strip()
    return None


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not the pinned build (or is missing)."""


def check_vllm_version() -> None:
    """Raise VLLMVersionError (one line) unless the installed vLLM build is the one requirements/ pins."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in _VLLM_PINS:
        try:
            installed = version(distribution)
        except PackageNotFoundError:
            continue
        pinned = pinned_vllm_version(distribution)
        if pinned is not None and installed != pinned:
            raise VLLMVersionError(f"{distribution} {installed} is installed but pmc is pinned to {distribution}=="
                               f"{pinned} (requirements/{_VLLM_PINS[distribution]}); reinstall with `make install`")
        return
    raise VLLMVersionError("vLLM is not installed (requirements/cpu.txt or gpu.txt); run `make install`")


def wait_until_ready(actor: Any, timeout_s: float = 900.0) -> None:
    """Block until the actor's engine is up; else a one-line RuntimeError naming the cause (the remote
    traceback stays on the exception's `__cause__`)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    try:
        ray.get(actor.ready.remote(), timeout=timeout_s)
    except GetTimeoutError as exc:
        raise RuntimeError(f"not up within {timeout_s:.0f} s") from exc
    except RayError as exc:
        raise RuntimeError(remote_error_summary(str(exc)) or type(exc).__name__) from exc


def stop_rollout_actor(actor: Any) -> None:
    """Shut the engine down, then end the actor process."""
    import ray
    from ray.exceptions import RayError

    try:
        ray.get(actor.close.remote(), timeout=120)
    except RayError:
        pass  # the actor is already dead or stuck: killing it below frees everything anyway
    ray.kill(actor)
