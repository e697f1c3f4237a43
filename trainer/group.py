"""A ZeRO-3 data-parallel group: one Ray actor per rank, each holding a `Zero3Trainer`.

The driver splits work across ranks, keeps them in lock-step and merges their metrics; an error in
any actor, or its death, comes back as a `TrainerRankError` that names the rank, as soon as Ray
reports it (the other ranks may be stuck in a collective with the dead one: they are killed, not
waited for). A group that ended cleanly can leave its rank processes to `KeptRanks`, so that the
session's next job of the same shape skips their start-up (imports of torch, DeepSpeed and vLLM's
transfer code: ~15 s for 2 ranks on 2 CPU cores).
"""

from __future__ import annotations

import gc
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import ray

from trainer.loss import missing_roles
from trainer.ray_calls import failure_message, wait_each
from trainer.records import TrainExample, merge_metrics
from trainer.scores import Objective
from trainer.config import TrainerConfig, TrainerJob
from trainer.zero3 import Zero3Trainer

SHUTDOWN_TIMEOUT_S = 60
SETTLE_S = 10  # how long the other ranks may take to finish a call that one rank failed


MMAP_THRESHOLD_BYTES = 1 << 20


class TrainerRankError(RuntimeError):
    def __init__(self, rank: int, method: str, cause: BaseException) -> None:
        super().__init__(failure_message(f"trainer rank {rank}", method, cause))
        self.rank = rank
        # the rank's process is gone, or stuck: the group cannot go on
        self.actor_lost = isinstance(cause, (ray.exceptions.RayActorError, TimeoutError))


class _RankActor:
    """Ray actor for one rank: built empty so the ranks can agree on a rendezvous address first."""

    def __init__(self) -> None:
        import torch

        self.trainer: Zero3Trainer | None = None
        self.threads_at_start = torch.get_num_threads()  # restored after a job that set torch_threads

    def rendezvous(self) -> tuple[str, int, int]:
        """This node's IP, a port free on it (rank 0's are the group's MASTER_ADDR/PORT) and this
        process's id (to see it gone after a kill)."""
        return ray.util.get_node_ip_address(), free_port(), os.getpid()

    def start(self, config: TrainerConfig, job: TrainerJob, rank: int, master_addr: str, port: int) -> None:
        self.trainer = Zero3Trainer(config, job, rank, master_addr, port)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.trainer, method)(*args)

    def end_job(self) -> None:
        """Drop the job (process group, model, optimizer, weight-transfer group); the process stays, as it
        was started, for a later job."""
        import torch

        trainer, self.trainer = self.trainer, None
        if trainer is not None:
            trainer.shutdown()
        del trainer
        gc.collect()
        torch.set_num_threads(self.threads_at_start)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _process_alive(pid: int) -> bool:
    """Whether `pid` still runs (an exited process its parent has not reaped yet does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def wait_all(refs: list[ray.ObjectRef], method: str, timeout_s: float | None = None) -> list[Any]:
    """Results by rank; the first error raised, as soon as it arrives, names its rank."""
    return wait_each(refs, timeout_s, lambda rank, cause: TrainerRankError(rank, method, cause))


@dataclass
class IdleRanks:
    """Rank processes of a group that ended cleanly: started, nothing loaded. `shape` is what a later
    group must ask for to use them (world size, device, placement); the placement group, if they were
    given one of their own, goes with them."""

    shape: tuple
    actors: list[Any]
    processes: list[tuple[str, int]]  # (node IP, pid) of each rank
    placement_group: Any = None


class KeptRanks:
    """Where a session keeps trainer ranks between its jobs. It holds at most one idle set: ranks hold
    their GPUs (or CPU bundles) while idle, so a set of another shape is ended before a new one starts."""

    def __init__(self) -> None:
        self._idle: IdleRanks | None = None

    @property
    def idle(self) -> IdleRanks | None:
        """The idle set kept now, if any."""
        return self._idle

    def take(self, shape: tuple) -> IdleRanks | None:
        """The idle set of `shape`, if there is one; any other idle set is ended."""
        idle, self._idle = self._idle, None
        if idle is not None and idle.shape == shape:
            return idle
        if idle is not None:
            end_ranks(idle.actors, idle.processes, idle.placement_group)
        return None

    def keep(self, idle: IdleRanks) -> None:
        if self._idle is not None:
            end_ranks(self._idle.actors, self._idle.processes, self._idle.placement_group)
        self._idle = idle

    def close(self) -> None:
        """End the idle ranks, if any."""
        self.take(())


def end_ranks(actors: list[Any], processes: list[tuple[str, int]], placement_group: Any = None) -> None:
    """End every rank now and return once they are gone, then release their placement group. Ray reports
    a killed actor dead before its process has exited, and a rank killed mid-save could otherwise write
    on after our cleanup: the processes on this node are watched until they exit (up to SETTLE_S)."""
    from ray.util.placement_group import remove_placement_group

    for actor in actors:
        ray.kill(actor)
    probes = [actor.rendezvous.remote() for actor in actors]  # fail once Ray has the actor dead
    ray.wait(probes, num_returns=len(probes), timeout=SETTLE_S)
    here = ray.util.get_node_ip_address()
    local = [pid for ip, pid in processes if ip == here]
    deadline = time.monotonic() + SETTLE_S
    while local and time.monotonic() < deadline:
        local = [pid for pid in local if _process_alive(pid)]
        time.sleep(0.05)
    if placement_group is not None:
        remove_placement_group(placement_group)


def _role_rows(batch: list[TrainExample], rank: int, world_size: int) -> list[TrainExample]:
    """Rank `rank`'s share of a batch: rows rank::world_size of each role, roles in order of appearance."""
    roles = list(dict.fromkeys(ex.role for ex in batch))
    return [ex for role in roles for ex in [e for e in batch if e.role == role][rank::world_size]]


class TrainerGroup:
    """`world_size` ZeRO-3 ranks as Ray actors; every method runs on all ranks together."""

    def __init__(
        self, config: TrainerConfig, job: TrainerJob,
        placements: list[dict[str, Any]] | None = None, call_timeout_s: float | None = None,
        owned_placement_group: Any = None, idle: IdleRanks | None = None,
        keeper: KeptRanks | None = None, shape: tuple = (),
    ) -> None:
        """`config.world_size` ranks train `job`; `placements`: Ray options
        per rank (resources + placement-group bundle, from `pmc_pipeline.runtime.placement.actor_options`);
        `call_timeout_s` bounds every group call; `owned_placement_group` is removed with the group
        (also when the group fails to start). `idle`: rank processes an earlier group left (instead of
        new ones; their placement group becomes this group's); `keeper`: where a clean `shutdown`
        leaves this group's processes, as `IdleRanks` of `shape`."""
        self._placement_group = idle.placement_group if idle else owned_placement_group
        self._processes: list[tuple[str, int]] = []  # (node IP, pid) of each rank
        world_size = config.world_size
        if placements is not None and len(placements) != world_size:
            raise ValueError(f"{len(placements)} placements for world_size {world_size}")
        if idle is not None and len(idle.actors) != world_size:
            raise ValueError(f"{len(idle.actors)} idle ranks for world_size {world_size}")
        self.world_size = world_size
        self.call_timeout_s = call_timeout_s
        self._failed = False
        self._keeper, self._shape = keeper, idle.shape if idle else shape
        if idle is not None:
            self._actors = list(idle.actors)
        else:
            # Without placements CPU actors claim no CPU slot: ranks time-share the cores. Ray starts them
            # with OMP_NUM_THREADS=1 (one torch thread each, right for 2 ranks on 2 cores); torch_threads
            # overrides. max_restarts=0: a restarted rank would have lost its shard; the run must stop
            # instead. A fixed glibc mmap threshold: large buffers (a gathered layer, its copy for the
            # weight push) go back to the OS when freed, instead of raising the threshold and staying in
            # the heap.
            default = {"num_gpus": 1} if job.on_gpus else {"num_cpus": 0}
            env = {"env_vars": {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}}
            self._actors = [ray.remote(_RankActor).options(max_restarts=0, runtime_env=env,
                                                           **(placements[rank] if placements else default))
                            .remote() for rank in range(world_size)]
        try:
            places = wait_all([a.rendezvous.remote() for a in self._actors], "rendezvous")
            self._processes = [(ip, pid) for ip, _, pid in places]
            (node_ip, port, _), node_ips = places[0], {ip for ip, _, _ in places}
            # all ranks on one node: keep the rendezvous on loopback
            master_addr = "127.0.0.1" if len(node_ips) == 1 else node_ip
            wait_all(
                [a.start.remote(config, job, rank, master_addr, port) for rank, a in enumerate(self._actors)],
                "start",
            )
        except BaseException:
            self._kill()
            self._release_placement()
            raise

    @property
    def actors(self) -> list[Any]:
        """The ranks' Ray actor handles, by rank (for diagnostics, and tests that kill a rank)."""
        return list(self._actors)

    def _call(self, method: str, per_rank_args: list[tuple] | None = None) -> list[Any]:
        args = per_rank_args or [()] * self.world_size
        return self._wait([a.call.remote(method, *arg) for a, arg in zip(self._actors, args)], method)

    def _wait(self, refs: list[ray.ObjectRef], method: str) -> list[Any]:
        """Results by rank. When a call fails, no rank is still running it once this raises: the caller
        may clean up (e.g. remove a half-written checkpoint) without a surviving rank writing on."""
        try:
            return wait_all(refs, method, self.call_timeout_s)
        except TrainerRankError as err:
            # a rank that raised may leave the others waiting in a collective for it: give them
            # SETTLE_S to finish, else the group is lost too
            if err.actor_lost or len(ray.wait(refs, num_returns=len(refs), timeout=SETTLE_S)[0]) < len(refs):
                self._failed = True
                self._kill()
            raise

    def train_batches(self, global_batches: list[list[TrainExample]], role_weights: dict[str, float],
                      objective: Objective | None = None) -> dict[str, Any]:
        """One micro-step per global batch; rank r trains on examples r::world_size of each batch, or, with
        an `objective` (`Zero3Trainer.train_steps`), rows r::world_size of each role, so that the i-th rows of
        two roles (DPO's refusal and true answer to one question) stay on one rank."""
        missing = missing_roles(global_batches, role_weights)
        if missing:
            raise ValueError(f"roles {sorted(missing)} have no entry in role_weights {role_weights}")
        split = _role_rows if objective is not None else (lambda batch, rank, size: batch[rank::size])
        shares = [
            ([split(batch, rank, self.world_size) for batch in global_batches], role_weights, objective)
            for rank in range(self.world_size)
        ]
        return merge_metrics(self._call("train_steps", shares))

    def answer_logprob_sums(self, examples: list[TrainExample]) -> list[float]:
        """Each example's summed answer-token log-prob under the current weights (`Zero3Trainer`'s), in order."""
        per_rank = self._call("answer_logprob_sums", [(examples[rank::self.world_size],)
                                                      for rank in range(self.world_size)])
        sums = [0.0] * len(examples)
        for rank, part in enumerate(per_rank):
            sums[rank::self.world_size] = part
        return sums

    def rank_pids(self) -> list[int]:
        """Each rank's process id, by rank (for memory probes from outside)."""
        return [pid for _, pid in self._processes]

    def transfer_address(self) -> tuple[str, int]:
        """Where the weight-transfer group meets: rank 0's node and a free port there."""
        ip, port, _ = wait_all([self._actors[0].rendezvous.remote()], "rendezvous")[0]
        return ip, port

    def init_weight_transfer(self, init_infos: list[Any], client: Any, bucket_bytes: int) -> None:
        """Every rank joins vLLM's weight-transfer protocol with its own init info (rank 0 also joins the
        engines' group through `client`; see `Zero3Trainer.init_weight_transfer`)."""
        self._call("init_weight_transfer", [(info, client, bucket_bytes) for info in init_infos])

    def push_weights(self) -> dict[str, Any]:
        """The trained weights into every engine, streamed from the shards; rank 0's seconds, bytes and
        peak memory growth."""
        return self._call("send_weights")[0]

    def save_pretrained(self, out_dir: str) -> None:
        self._call("save_pretrained", [(str(out_dir),)] * self.world_size)

    def save_state(self, directory: str) -> None:
        """Every rank's resumable state (weights shard, optimizer, scheduler, RNG) under `directory`."""
        self._call("save_state", [(str(directory),)] * self.world_size)

    def load_state(self, directory: str) -> None:
        self._call("load_state", [(str(directory),)] * self.world_size)

    def effective_settings(self) -> list[dict[str, Any]]:
        """One `Zero3Trainer.effective_settings` per rank, by rank."""
        return self._call("effective_settings")

    def shard_reports(self) -> list[dict[str, dict[str, Any]]]:
        """One `Zero3Trainer.shard_report` per rank, by rank."""
        return self._call("shard_report")

    def shutdown(self, kill: bool = False) -> None:
        """End the job on every rank (process group, model, transfer group); then hand the processes to
        the keeper, or end them.

        After a failed call, or with `kill` (the driver was interrupted mid-call), the ranks are killed
        straight away: a rank busy in a step, or waiting in a collective for a dead peer, would not answer.
        """
        if not (self._failed or kill or not self._actors):
            try:
                wait_all([a.end_job.remote() for a in self._actors], "end_job", SHUTDOWN_TIMEOUT_S)
            except TrainerRankError:
                pass  # a rank that cannot end its job cleanly is not kept: killed below
            else:
                if self._keeper is not None:
                    self._keeper.keep(IdleRanks(self._shape, self._actors, self._processes, self._placement_group))
                    self._actors, self._placement_group = [], None
                    return
        self._kill()
        self._release_placement()

    def _release_placement(self) -> None:
        from ray.util.placement_group import remove_placement_group

        group, self._placement_group = self._placement_group, None
        if group is not None:
            remove_placement_group(group)

    def _kill(self) -> None:
        actors, self._actors = self._actors, []
        end_ranks(actors, self._processes)
