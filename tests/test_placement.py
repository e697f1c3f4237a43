"""Placement plans (pure) and their Ray side: CPU bundles here, the same code as GPU bundles."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pmc_pipeline.errors import ConfigError
from pmc_pipeline.runtime.placement import PlacementPlan, actor_options, plan_from_config, release, reserve


def test_separate_plan_gives_each_engine_tp_gpus_and_each_rank_one():
    plan = PlacementPlan(engines=2, tensor_parallel_size=2, trainer_ranks=4, colocate=False, use_gpus=True)
    assert plan.gpus == 8
    assert plan.bundles("engines") == [{"GPU": 2.0}, {"GPU": 2.0}]
    assert plan.bundles("trainer") == [{"GPU": 1.0}] * 4
    assert plan.engine_slot(1).resources == {"num_gpus": 2.0} and plan.engine_slot(1).bundle_index == 1
    assert [plan.trainer_slot(r).bundle_index for r in range(4)] == [0, 1, 2, 3]


def test_colocated_plan_shares_each_gpu_between_an_engine_and_a_rank():
    plan = PlacementPlan(engines=2, tensor_parallel_size=1, trainer_ranks=2, colocate=True, use_gpus=True)
    assert plan.gpus == 2 and plan.bundles("shared") == [{"GPU": 1.0}, {"GPU": 1.0}]
    engine, rank = plan.engine_slot(1), plan.trainer_slot(1)
    assert (engine.group, engine.bundle_index) == (rank.group, rank.bundle_index) == ("shared", 1)
    assert engine.resources["num_gpus"] + rank.resources["num_gpus"] <= 1.0


def test_cpu_plan_uses_cpu_bundles():
    plan = PlacementPlan(engines=1, tensor_parallel_size=4, trainer_ranks=2, colocate=False, use_gpus=False)
    assert plan.gpus == 0
    assert plan.bundles("engines") == [{"CPU": 1.0}] and plan.bundles("trainer") == [{"CPU": 1.0}] * 2
    assert all("num_gpus" not in plan.trainer_slot(r).resources for r in range(2))


@pytest.mark.parametrize("kwargs, key", [
    ({"engines": 1, "tensor_parallel_size": 2, "trainer_ranks": 2}, "rollout.tensor_parallel_size"),
    ({"engines": 3, "tensor_parallel_size": 1, "trainer_ranks": 2}, "resources.rollout_engines"),
])
def test_impossible_colocation_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        PlacementPlan(colocate=True, use_gpus=True, **kwargs)


def test_plan_from_config_reads_the_resources_keys():
    from pmc_pipeline.config import load_config

    cfg = load_config("unlearn", "unlearn/llama-3.2-3b-8gpu")
    plan = plan_from_config(cfg, use_gpus=True)
    assert (plan.engines, plan.tensor_parallel_size, plan.trainer_ranks, plan.colocate) == (
        cfg.resources.rollout_engines, cfg.rollout.tensor_parallel_size, cfg.trainer.world_size, False)
    assert plan.strategy == "PACK"
    assert plan_from_config(cfg, use_gpus=True, with_rollout=False).engines == 0


def test_hydra_defaults_inherit_the_single_gpu_settings():
    from pmc_pipeline.config import load_config

    base = load_config("unlearn", "unlearn/phi-1.5")
    one = load_config("unlearn", "unlearn/phi-1.5-1gpu")
    assert one.sampling == base.sampling and one.model == base.model
    assert one.resources.colocate and not base.resources.colocate
    # colocated engines sleep while the rank trains: no overlapped epoch, the rest of pmc: inherited
    assert not one.pmc.overlap and base.pmc.overlap
    assert replace(one.pmc, overlap=True) == base.pmc


@pytest.mark.engines
def test_actors_land_in_their_cpu_bundles(ray_instance):
    import ray

    @ray.remote
    class Where:
        def placement(self):
            from ray.util import get_current_placement_group

            pg = get_current_placement_group()
            return None if pg is None else pg.id.hex()

    plan = PlacementPlan(engines=0, tensor_parallel_size=1, trainer_ranks=2, colocate=False, use_gpus=False)
    pg = reserve(plan, "trainer", timeout_s=60)
    try:
        actors = [Where.options(**actor_options(pg, plan.trainer_slot(r))).remote() for r in range(2)]
        assert ray.get([a.placement.remote() for a in actors]) == [pg.id.hex()] * 2
        table = ray.util.placement_group_table(pg)
        assert table["state"] == "CREATED" and list(table["bundles"].values()) == [{"CPU": 1.0}] * 2
        for actor in actors:
            ray.kill(actor)
    finally:
        release(pg)


@pytest.mark.engines
def test_a_placement_the_cluster_cannot_hold_fails_with_the_numbers(ray_instance):
    from pmc_pipeline.errors import PMCError

    plan = PlacementPlan(engines=0, tensor_parallel_size=1, trainer_ranks=2, colocate=False, use_gpus=True)
    with pytest.raises(PMCError, match=r"trainer placement within 2 s: it needs 2 bundle\(s\) \{'GPU': 1.0\}"):
        reserve(plan, "trainer", timeout_s=2)


# -- several engines behind one client (stand-in engines: the session's one vLLM engine stays unique) --

@pytest.fixture(scope="module")
def fake_engines(ray_instance):
    import ray

    @ray.remote(num_cpus=0)
    class FakeEngine:
        """Answers what it was asked, so the client's split and seeds can be checked."""

        def __init__(self, name):
            self.name, self.loaded = name, []

        def sample(self, prompt_ids, n, temperature, top_p, max_tokens, seed):
            return [[(self.name, ids, None if seed is None else seed + i * n)] for i, ids in enumerate(prompt_ids)]

        def greedy(self, prompt_ids, max_tokens):
            return [(self.name, ids) for ids in prompt_ids]

        def init_weight_transfer_engine(self, init_info):
            self.loaded.append(("init", init_info))

        def update_weights(self, update_info):
            self.loaded.append(("update", update_info))

        def weights_seen(self):
            return self.loaded

    engines = [FakeEngine.remote(f"e{i}") for i in range(3)]
    yield engines
    for engine in engines:
        ray.kill(engine)


@pytest.mark.engines
def test_client_splits_prompts_in_order_with_single_batch_seeds(fake_engines):
    from rollout.client import RolloutClient

    prompts = [[i] for i in range(7)]
    samples = RolloutClient(fake_engines).sample(prompts, 4, 1.0, 0.95, 8, seed=100)
    assert [s[0][1] for s in samples] == prompts  # order kept
    assert [s[0][2] for s in samples] == [100 + i * 4 for i in range(7)]  # as one engine would seed them
    assert {s[0][0] for s in samples} == {"e0", "e1", "e2"}  # every engine got a piece
    assert [g[1] for g in RolloutClient(fake_engines).greedy(prompts, 8)] == prompts


@pytest.mark.engines
def test_client_gives_each_engine_its_own_transfer_ranks(fake_engines):
    """vLLM numbers an engine's workers rank_offset + w: separate engines must not share offsets."""
    import ray

    from rollout.client import RolloutClient
    from rollout.transfer import group_ranks

    client = RolloutClient(fake_engines, workers_per_engine=2)
    client.init_weight_transfer_engine({"master_port": 1234, "world_size": 7, "rank_offset": 1})
    client.update_weights({"names": ["w"]})
    seen = [ray.get(e.weights_seen.remote())[-2:] for e in fake_engines]
    offsets = [init["rank_offset"] for (_, init), _ in seen]
    assert offsets == [ranks[0] for ranks in group_ranks(3, 2)] == [1, 3, 5]
    assert all(init["world_size"] == 7 and update == ("update", {"names": ["w"]}) for (_, init), update in seen)


@pytest.mark.engines
def test_a_dead_engine_is_named(ray_instance):
    import ray

    from rollout.actor import RolloutEngineError
    from rollout.client import RolloutClient

    @ray.remote(num_cpus=0, max_restarts=0)
    class Engine:
        def greedy(self, prompt_ids, max_tokens):
            import os

            if prompt_ids and prompt_ids[0] == [99]:
                os._exit(1)  # this engine's process dies mid-call
            return [[0] for _ in prompt_ids]

    engines = [Engine.remote(), Engine.remote()]
    with pytest.raises(RolloutEngineError,
                       match=r"rollout engine 1 died in greedy \(\w*Actor\w*Error: its Ray actor process is gone\)"):
        RolloutClient(engines).greedy([[1], [99]], 4)
    for engine in engines:
        ray.kill(engine)


def test_a_vllm_other_than_the_pinned_one_is_one_line(monkeypatch):
    from rollout import actor

    monkeypatch.setattr(actor, "pinned_vllm_version", lambda distribution: "0.0.1")
    with pytest.raises(actor.VLLMVersionError, match=r"is installed but pmc is pinned to vllm(-cpu)?==0\.0\.1 "
                                                     r"\(requirements/(cpu|gpu)\.txt\)"):
        actor.check_vllm_version()


@pytest.mark.engines
def test_resources_call_timeout_s_bounds_a_hung_engine(ray_instance, tiny_model_dir):
    """An engine that hangs without dying: resources.call_timeout_s reaches the session, and the
    session's rollout client names the engine and ends the call after that long."""
    import ray

    from pmc_pipeline.config import from_mapping
    from pmc_pipeline.recipes.roles import open_session
    from pmc_pipeline.runtime.session import PipelineSession
    from rollout.actor import RolloutEngineError

    cfg = from_mapping("unlearn", {"model": {"path": str(tiny_model_dir)}, "run_dir": "unused",
                                   "resources": {"call_timeout_s": 2.0}})
    configured = open_session(cfg)
    configured.close()
    assert configured.call_timeout_s == 2.0

    @ray.remote(num_cpus=0, max_restarts=0)
    class HungEngine:
        def load_checkpoint(self, model_dir):
            return {"seconds": 0.0, "bytes": 0}

        def greedy(self, prompt_ids, max_tokens):
            import time

            time.sleep(600)

    engine = HungEngine.remote()
    session = PipelineSession(rollout_actor=engine, call_timeout_s=configured.call_timeout_s)
    try:
        client = session.rollout(str(tiny_model_dir), None, "float32", 0)
        with pytest.raises(RolloutEngineError,
                           match=r"rollout engine 0 failed in greedy: TimeoutError: no answer within 2 s"):
            client.greedy([[1]], 4)
    finally:
        ray.kill(engine)
