"""Where the actors go: rollout engines x tensor-parallel GPUs, ZeRO-3 trainer ranks, shared or not.

`PlacementPlan` is pure (built from a config, printed by `pmc check`); `reserve` turns it into Ray
placement groups and `actor_options` into the `.options(...)` of each actor.

    separate  (colocate=false): one bundle {GPU: tp} per engine, one bundle {GPU: 1} per trainer rank;
    colocated (colocate=true):  one bundle {GPU: 1} per trainer rank; engine e shares bundle e with
                                rank e (each takes half the GPU; vLLM sleeps while the trainer trains).
On a machine without GPUs the same plan uses CPU bundles ({CPU: 1} per actor, {CPU: 2} when shared),
so the placement code runs in every test.
"""

from __future__ import annotations

import uuid

from dataclasses import dataclass
from typing import Any

from pmc_pipeline.errors import ConfigError, PMCError

# the share of a colocated bundle each role asks for (Ray packs two halves onto one GPU)
COLOCATED_SHARE = 0.5


@dataclass(frozen=True)
class Slot:
    """One actor's place: which bundle of which group, and what it asks Ray for."""

    group: str  # "engines", "trainer" or "shared"
    bundle_index: int
    resources: dict[str, float]


@dataclass(frozen=True)
class PlacementPlan:
    engines: int  # vLLM engines (0 for fine-tuning)
    tensor_parallel_size: int  # GPUs per engine
    trainer_ranks: int  # ZeRO-3 world size
    colocate: bool
    use_gpus: bool
    strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.colocate and self.engines:
            if self.tensor_parallel_size != 1:
                raise ConfigError(f"resources.colocate=true needs rollout.tensor_parallel_size=1 (one engine per "
                                  f"GPU it shares with a trainer rank), got {self.tensor_parallel_size}")
            if self.engines > self.trainer_ranks:
                raise ConfigError(f"resources.rollout_engines={self.engines} > trainer.world_size="
                                  f"{self.trainer_ranks}: with resources.colocate=true each engine shares "
                                  "one trainer rank's GPU")

    @property
    def gpus(self) -> int:
        """GPUs the whole plan needs (0 on CPU)."""
        if not self.use_gpus:
            return 0
        if self.colocate:
            return self.trainer_ranks
        return self.engines * self.tensor_parallel_size + self.trainer_ranks

    def bundles(self, group: str) -> list[dict[str, float]]:
        """The placement group's bundles for 'engines', 'trainer' or 'shared' (colocated)."""
        unit = "GPU" if self.use_gpus else "CPU"
        if group == "shared":
            # on GPUs both halves fit one GPU; on CPU each role takes a whole logical CPU
            return [{unit: 1.0 if self.use_gpus else 2.0} for _ in range(self.trainer_ranks)]
        if group == "engines":
            per_engine = float(self.tensor_parallel_size) if self.use_gpus else 1.0
            return [{unit: per_engine} for _ in range(self.engines)]
        if group == "trainer":
            return [{unit: 1.0} for _ in range(self.trainer_ranks)]
        raise ValueError(f"unknown placement group {group!r}")

    def _share(self) -> dict[str, float]:
        return {"num_gpus": COLOCATED_SHARE} if self.use_gpus else {"num_cpus": 1.0}

    def engine_slot(self, engine: int) -> Slot:
        if self.colocate:
            return Slot("shared", engine, self._share())
        resources = {"num_gpus": float(self.tensor_parallel_size)} if self.use_gpus else {"num_cpus": 1.0}
        return Slot("engines", engine, resources)

    def trainer_slot(self, rank: int) -> Slot:
        if self.colocate:
            return Slot("shared", rank, self._share())
        return Slot("trainer", rank, {"num_gpus": 1.0} if self.use_gpus else {"num_cpus": 1.0})

    def describe(self) -> list[str]:
        """Human-readable lines: what goes where."""
        unit = "GPU" if self.use_gpus else "CPU bundle"
        lines = [f"placement: {'colocated' if self.colocate else 'separate'}, Ray strategy {self.strategy}, "
                 + (f"{self.gpus} GPU(s) in total" if self.use_gpus else "CPU bundles (no GPUs)")]
        for e in range(self.engines):
            slot = self.engine_slot(e)
            lines.append(f"  rollout engine {e}: {self.tensor_parallel_size if self.use_gpus else 1} {unit}(s), "
                         f"tensor parallel {self.tensor_parallel_size}, bundle {slot.group}[{slot.bundle_index}] "
                         f"{_fmt_resources(slot.resources)}")
        for r in range(self.trainer_ranks):
            slot = self.trainer_slot(r)
            lines.append(f"  trainer rank {r}: ZeRO-3 shard 1/{self.trainer_ranks}, bundle "
                         f"{slot.group}[{slot.bundle_index}] {_fmt_resources(slot.resources)}")
        return lines


def _fmt_resources(resources: dict[str, float]) -> str:
    return "(" + ", ".join(f"{k}={v:g}" for k, v in resources.items()) + ")"


def plan_from_config(cfg: Any, use_gpus: bool, with_rollout: bool = True) -> PlacementPlan:
    """The plan a finetune (with_rollout=False) or unlearn config asks for."""
    res = cfg.resources
    rollout = getattr(cfg, "rollout", None) if with_rollout else None
    return PlacementPlan(
        engines=int(res.rollout_engines) if rollout is not None else 0,
        tensor_parallel_size=int(rollout.tensor_parallel_size) if rollout is not None else 1,
        trainer_ranks=int(cfg.trainer.world_size),
        colocate=bool(res.colocate),
        use_gpus=use_gpus,
        strategy=str(res.placement_strategy).upper(),
    )


# -- Ray ----------------------------------------------------------------------------------------------

def reserve(plan: PlacementPlan, group: str, timeout_s: float) -> Any:
    """Create and wait for one placement group; a cluster that cannot hold it fails with the numbers."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = plan.bundles(group)
    # Ray's placement-group names are cluster-wide: two jobs (or sessions) on one cluster need their own
    pg = placement_group(bundles, strategy=plan.strategy, name=f"pmc-{group}-{uuid.uuid4().hex[:8]}")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PMCError(f"the Ray cluster could not hold the {group} placement within {timeout_s:.0f} s: it "
                       f"needs {len(bundles)} bundle(s) {bundles[0]} ({plan.strategy}); the cluster has "
                       f"{ray.cluster_resources()} (see resources.* and `pmc check`)") from None
    return pg


def job_bundles(plan: PlacementPlan) -> tuple[list[dict[str, float]], dict[str, int]]:
    """A whole job in one placement group (a sweep trial's, which Ray Tune reserves): a CPU for the job's
    driver first, then the plan's groups; and the bundle index where each group starts."""
    bundles: list[dict[str, float]] = [{"CPU": 1.0}]
    starts = {}
    for group in ("shared",) if plan.colocate else ("engines", "trainer"):
        starts[group] = len(bundles)
        bundles += plan.bundles(group)
    return bundles, starts


def release(pg: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    if pg is not None:
        remove_placement_group(pg)


def actor_options(pg: Any, slot: Slot) -> dict[str, Any]:
    """`.options(...)` for an actor in `slot` of placement group `pg` (None: no placement group)."""
    options: dict[str, Any] = dict(slot.resources)
    if pg is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=slot.bundle_index,
            # vLLM's own workers (tensor parallel > 1) land in the engine's group too
            placement_group_capture_child_tasks=True,
        )
    return options
