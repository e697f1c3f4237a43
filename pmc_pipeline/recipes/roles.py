"""From a checked config to the roles: trainer and rollout settings, the Ray session, and one-line
errors naming the actor and the stage when a role fails."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from omegaconf import DictConfig

from pmc_pipeline import config as config_module
from pmc_pipeline.errors import Interrupted, PMCError
from pmc_pipeline.runtime.session import PipelineSession

log = logging.getLogger(__name__)


def trainer_settings(cfg: DictConfig, model_source: str, micro_batch_size: int, total_steps: int | None):
    from trainer.settings import TrainerSettings

    t = cfg.trainer
    use_gpus = config_module.use_gpus(cfg)
    backend = t.backend if t.backend != "auto" else ("nccl" if use_gpus else "gloo")
    warmup = int(round(t.warmup_ratio * total_steps)) if total_steps else 0
    return TrainerSettings(
        model_path=model_source, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, micro_batch_size=micro_batch_size,
        grad_accum=t.grad_accum, warmup_steps=warmup, total_steps=total_steps,
        gradient_checkpointing=t.gradient_checkpointing, label_smoothing=t.label_smoothing,
        seed=cfg.seed, backend=backend, torch_threads=t.torch_threads,
    )


def rollout_settings(cfg: DictConfig, model_source: str):
    from rollout.worker import RolloutSettings

    r = cfg.rollout
    return RolloutSettings(
        model_path=model_source, dtype=cfg.model.dtype, max_model_len=r.max_model_len,
        tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
        cpu_kv_cache_gib=r.cpu_kv_cache_gib, enforce_eager=r.enforce_eager,
        enable_prefix_caching=r.enable_prefix_caching, seed=cfg.seed,
    )


def open_session(cfg: DictConfig) -> PipelineSession:
    from pmc_pipeline.runtime.placement import plan_from_config

    res, use_gpus = cfg.resources, config_module.use_gpus(cfg)
    plan = plan_from_config(cfg, use_gpus, with_rollout="rollout" in cfg)
    return PipelineSession(res.ray_address, res.num_cpus, use_gpus=use_gpus, plan=plan,
                           placement_timeout_s=res.placement_timeout_s, call_timeout_s=res.call_timeout_s)


@dataclass
class JobRoles:
    """A job's session and, once started, its trainer group."""

    session: PipelineSession
    trainer: Any = None


@contextlib.contextmanager
def job_roles(cfg: DictConfig, session: PipelineSession | None) -> Iterator[JobRoles]:
    """The job's session (opened here unless one is lent) and a slot for its trainer. On the way out the
    trainer shuts down and a session opened here closes; after an interrupt both are killed at once,
    mid-call if need be, instead of waiting for the call in flight."""
    roles = JobRoles(session or open_session(cfg))
    interrupted = False
    try:
        yield roles
    except Interrupted:
        interrupted = True
        raise
    finally:
        if roles.trainer is not None:
            roles.trainer.shutdown(kill=interrupted)
        if session is None:
            roles.session.close(abort=interrupted)


@contextlib.contextmanager
def failures_named(place: Callable[[], str]) -> Iterator[None]:
    """A rollout engine or trainer rank that died or failed becomes a one-line error, and an interrupt
    says where the job was: both name `place()` (e.g. "epoch 3")."""
    from rollout.actor import RolloutEngineError
    from trainer.group import TrainerRankError

    try:
        yield
    except Interrupted as exc:
        raise exc.where(f" in {place()}") from None
    except (RolloutEngineError, TrainerRankError) as exc:
        raise PMCError(f"{place()}: {exc}") from exc
