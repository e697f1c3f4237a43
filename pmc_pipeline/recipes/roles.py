"""From a checked config to the roles: the trainer's job, the Ray session, and one-line errors naming
the actor and the stage when a role fails."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pmc_pipeline import config as config_module
from pmc_pipeline.errors import Interrupted, PMCError
from pmc_pipeline.runtime.session import PipelineSession
from trainer.config import TrainerJob

log = logging.getLogger(__name__)


def trainer_job(cfg: Any, model_source: str, micro_batch_size: int, total_steps: int | None) -> TrainerJob:
    """What this job gives the trainer besides its `trainer:` section: the model, the schedule, and
    whether the retain (and data.keep's) term is a KL from the starting model (an unlearn config's
    `retain_loss`)."""
    kl_roles: tuple[str, ...] = ()
    if getattr(cfg, "retain_loss", "nll") == "kl":
        kl_roles = ("retain", "keep") if getattr(cfg.data, "keep", None) else ("retain",)
    return TrainerJob(model_path=model_source, dtype=cfg.model.dtype, seed=cfg.seed, micro_batch_size=micro_batch_size,
                      total_steps=total_steps, on_gpus=config_module.use_gpus(cfg),
                      gguf_file=cfg.model.gguf_file,
                      kl_roles=kl_roles)


def open_session(cfg: Any, job_group: Any = None, kept_ranks: Any = None) -> PipelineSession:
    """The session a job's config asks for; `job_group`: a placement group that already holds the whole
    job (a sweep trial's, laid out by `placement.job_bundles`); `kept_ranks`: trainer ranks another
    session keeps between jobs, lent to this one (`trainer.group.KeptRanks`)."""
    from pmc_pipeline.runtime.placement import plan_from_config

    res, use_gpus = cfg.resources, config_module.use_gpus(cfg)
    plan = plan_from_config(cfg, use_gpus, with_rollout=getattr(cfg, "needs_rollout", hasattr(cfg, "rollout")))
    return PipelineSession(res.ray_address, res.num_cpus, use_gpus=use_gpus, plan=plan,
                           placement_timeout_s=res.placement_timeout_s, call_timeout_s=res.call_timeout_s,
                           job_group=job_group, kept_ranks=kept_ranks)


@dataclass
class JobRoles:
    """A job's session and, once started, its trainer group."""

    session: PipelineSession
    trainer: Any = None


@contextlib.contextmanager
def job_roles(cfg: Any, session: PipelineSession | None) -> Iterator[JobRoles]:
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
