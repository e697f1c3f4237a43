"""The Ray side of the driver: one Ray instance, the rollout actor and trainer groups.

A session outlives a single job so the demo (fine-tune, evaluate, unlearn, evaluate) and a test
session start Ray and the vLLM engine once; a later job with a model of the same architecture gets
the running engine with the new checkpoint's weights loaded in place, and a later job with the same
world size gets the trainer rank processes the last one left (`trainer.group.KeptRanks`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from pmc_pipeline.errors import PMCError, raise_on_stop_signals
from pmc_pipeline.models.source import architecture_signature
from pmc_pipeline.runtime.progress import Heartbeat

if TYPE_CHECKING:
    from rollout.client import RolloutClient
    from rollout.config import RolloutConfig
    from trainer.config import TrainerConfig, TrainerJob
    from trainer.group import KeptRanks, TrainerGroup

log = logging.getLogger(__name__)


def init_ray(ray_address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to RAY_ADDRESS / `ray_address` when set, else start a local instance. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS")
    # ray.init replaces the SIGTERM handler with sys.exit; the CLI's (an Interrupted that names the epoch) stays
    handler = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only instance
        ray.init(
            address="local",
            num_cpus=num_cpus or max(os.cpu_count() or 1, 8),  # logical slots; CPU actors ask for 0
            include_dashboard=False,
            log_to_driver=True,
        )
    if handler is not None and handler is signal.getsignal(signal.SIGINT):  # both ours: the CLI set them
        raise_on_stop_signals()
    return True


class PipelineSession:
    """Owns Ray, the long-lived rollout engines and their placement; hands out trainer groups.

    `plan` (pmc_pipeline.runtime.placement.PlacementPlan) says how many engines and trainer ranks go where;
    without one: one engine, and as many trainer ranks as asked, each in a placement group of its own
    role (GPU bundles on GPUs, CPU bundles otherwise). `job_group` (a sweep trial's placement group,
    laid out by `placement.job_bundles(plan)`) holds every actor instead. `rollout_actor` lends the
    session a running engine (tests share one) instead of starting its own; `kept_ranks` lends it the
    trainer ranks another session keeps between jobs (tests share them too).
    """

    def __init__(self, ray_address: str | None = None, num_cpus: int | None = None, use_gpus: bool = False,
                 rollout_actor: Any = None, plan: Any = None, placement_timeout_s: float = 600.0,
                 call_timeout_s: float | None = None, job_group: Any = None, kept_ranks: KeptRanks | None = None):
        self.use_gpus = use_gpus
        self.plan = plan
        self.job_group = job_group
        self.placement_timeout_s = placement_timeout_s
        self.call_timeout_s = call_timeout_s
        self._started_ray = init_ray(ray_address, num_cpus)
        self._rollout_actors: list[Any] = [rollout_actor] if rollout_actor is not None else []
        self._owns_rollout = rollout_actor is None
        from trainer.group import KeptRanks

        self._owns_kept_ranks = kept_ranks is None
        self.kept_ranks = kept_ranks or KeptRanks()
        self._rollout_key: tuple | None = None
        self._groups: dict[str, Any] = {}  # placement groups by name ("engines", "shared")
        # the unlearn recipe starts the trainer in a thread while engines start: colocated, both reserve "shared"
        self._groups_lock = threading.Lock()
        from rollout.transfer import transfer_backend

        # how trainer weights reach the engines this session starts (a lent engine runs on the CPU: gloo)
        self.transfer_backend = transfer_backend(use_gpus, bool(plan is not None and plan.colocate))

    def rollout(self, model_source: str, config: RolloutConfig, dtype: str, seed: int) -> RolloutClient:
        """Running engines holding `model_source`'s weights (started, reused or restarted)."""
        if self._rollout_actors and not self._owns_rollout:
            return self._load_into_running_engines(model_source)  # an engine lent to us: same architecture
        key = (architecture_signature(model_source), config, dtype, seed)
        if self._rollout_actors and key == self._rollout_key:
            return self._load_into_running_engines(model_source)
        from rollout.client import RolloutClient

        self._stop_engines()
        self._rollout_actors = self._start_engines(model_source, config, dtype, seed)
        self._owns_rollout, self._rollout_key = True, key
        return RolloutClient(self._rollout_actors, self.call_timeout_s, config.tensor_parallel_size)

    def _start_engines(self, model_source: str, config: RolloutConfig, dtype: str, seed: int) -> list[Any]:
        import ray

        from pmc_pipeline.runtime import placement
        from rollout.actor import VLLMVersionError, start_rollout_actor, wait_until_ready

        plan = self.plan or placement.PlacementPlan(engines=1, tensor_parallel_size=config.tensor_parallel_size,
                                                    trainer_ranks=1, colocate=False, use_gpus=self.use_gpus)
        log.info("starting %d vLLM rollout engine(s) on %s", plan.engines, model_source)
        actors = []
        try:
            for engine in range(plan.engines):
                options = self._actor_options(plan, plan.engine_slot(engine))
                actors.append(start_rollout_actor(config, model_source, dtype, seed, use_gpus=self.use_gpus,
                                                  transfer_backend=self.transfer_backend, placement=options,
                                                  engines=plan.engines))
            ready = []
            with Heartbeat(f"starting {plan.engines} vLLM rollout engine(s)",
                           lambda: f"{len(ready)}/{plan.engines} ready"):
                for engine, actor in enumerate(actors):  # the engines start in parallel; wait for all
                    try:
                        wait_until_ready(actor)
                    except RuntimeError as exc:  # vLLM rejected the model or settings, or ran out of memory
                        raise PMCError(f"rollout engine {engine} failed to start on {model_source}: {exc}") from exc
                    ready.append(engine)
        except VLLMVersionError as exc:
            raise PMCError(str(exc)) from None
        except BaseException:
            for actor in actors:
                ray.kill(actor)
            raise
        return actors

    def _actor_options(self, plan: Any, slot: Any) -> dict[str, Any]:
        """Where an actor of `slot` goes: its bundle in the job's group, or in the session's group of its role."""
        import dataclasses

        from pmc_pipeline.runtime import placement

        if self.job_group is not None:
            _, starts = placement.job_bundles(plan)
            slot = dataclasses.replace(slot, bundle_index=starts[slot.group] + slot.bundle_index)
            return placement.actor_options(self.job_group, slot)
        return placement.actor_options(self._group(plan, slot.group), slot)

    def _group(self, plan: Any, name: str) -> Any:
        """The session's placement group `name` ("engines" or "shared"), reserved on first use."""
        from pmc_pipeline.runtime import placement

        with self._groups_lock:
            if name not in self._groups:
                self._groups[name] = placement.reserve(plan, name, self.placement_timeout_s)
            return self._groups[name]

    def _load_into_running_engines(self, model_source: str) -> RolloutClient:
        from rollout.client import RolloutClient

        client = RolloutClient(self._rollout_actors, self.call_timeout_s)
        client.load_checkpoint(model_source)
        return client

    def trainer(self, config: TrainerConfig, job: TrainerJob) -> TrainerGroup:
        """A ZeRO-3 group; with a plan its ranks go to the plan's trainer (or shared) bundles. In a group
        of their own, the ranks an earlier job of the same shape left are used again."""
        from pmc_pipeline.runtime import placement
        from trainer.group import TrainerGroup, TrainerRankError

        world_size = config.world_size
        if self.plan is not None and world_size != self.plan.trainer_ranks:
            raise PMCError(f"trainer.world_size={world_size} differs from the placement plan's "
                           f"{self.plan.trainer_ranks} trainer ranks")
        plan = self.plan or placement.PlacementPlan(engines=0, tensor_parallel_size=1, trainer_ranks=world_size,
                                                    colocate=False, use_gpus=self.use_gpus)
        slots = [plan.trainer_slot(rank) for rank in range(world_size)]
        if plan.colocate or self.job_group is not None:
            return TrainerGroup(config, job, call_timeout_s=self.call_timeout_s,
                                placements=[self._actor_options(plan, s) for s in slots])
        # a placement group of its own, kept with the ranks between jobs and released with them
        shape = (world_size, plan.use_gpus, plan.strategy, job.on_gpus)
        idle = self.kept_ranks.take(shape)
        if idle is not None:
            try:
                return TrainerGroup(config, job, call_timeout_s=self.call_timeout_s, idle=idle, keeper=self.kept_ranks)
            except TrainerRankError as exc:
                if not exc.actor_lost:
                    raise
                log.warning("the kept trainer ranks are gone (%s); starting new ones", exc)
        pg = placement.reserve(plan, "trainer", self.placement_timeout_s)
        return TrainerGroup(config, job, call_timeout_s=self.call_timeout_s,
                            placements=[placement.actor_options(pg, s) for s in slots], owned_placement_group=pg,
                            keeper=self.kept_ranks, shape=shape)

    def connect_weight_push(self, trainer: TrainerGroup, rollout: RolloutClient, config: RolloutConfig) -> None:
        """Trainer rank 0 and every engine worker join one weight-transfer group (vLLM's protocol; rank
        0 hosts it); from then on `trainer.push_weights()` streams the weights into the engines."""
        from rollout.transfer import trainer_init_info

        address, port = trainer.transfer_address()
        world_size = 1 + len(rollout.actors) * rollout.workers_per_engine
        infos = [trainer_init_info(self.transfer_backend, rank, address, port, world_size,
                                   config.weight_push_timeout_s) for rank in range(trainer.world_size)]
        trainer.init_weight_transfer(infos, rollout, config.weight_bucket_mb * 2**20)

    def _stop_engines(self) -> None:
        from rollout.actor import stop_rollout_actor

        if self._owns_rollout:
            for actor in self._rollout_actors:
                stop_rollout_actor(actor)
        self._rollout_actors = []

    def close(self, abort: bool = False) -> None:
        """Stop the engines (abort: kill them at once, mid-call if need be), release placements, end Ray."""
        import ray

        from pmc_pipeline.runtime import placement

        if abort and self._owns_rollout:
            for actor in self._rollout_actors:
                ray.kill(actor)
            self._rollout_actors = []
        self._stop_engines()
        if self._owns_kept_ranks:
            self.kept_ranks.close()
        for pg in self._groups.values():
            placement.release(pg)
        self._groups = {}
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> "PipelineSession":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        from pmc_pipeline.errors import Interrupted

        self.close(abort=exc_type is not None and issubclass(exc_type, Interrupted))
