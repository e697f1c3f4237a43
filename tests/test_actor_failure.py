"""A trainer rank killed mid-epoch: the driver stops with one clear error naming the rank and epoch.

The surviving rank is stuck in a gloo collective with the dead one; the driver must neither wait for
it nor hang. Uses a world-size-2 trainer on the tiny model (CPU bundles), no vLLM engine.
"""

from __future__ import annotations

import threading

import pytest

from pmc_pipeline.config import from_mapping
from pmc_pipeline.errors import PMCError
from pmc_pipeline.recipes.finetune import run_finetune
from pmc_pipeline.runtime.session import PipelineSession

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(2, 2)]

KILL_IN_EPOCH = 2
BOUND_S = 240  # a hang check, not a speed figure: the run takes well under this when it works


class KillingSession(PipelineSession):
    """Kills trainer rank 1's actor one second into epoch KILL_IN_EPOCH."""

    def trainer(self, config, job):
        import ray

        group = super().trainer(config, job)
        original, calls = group.train_batches, []

        def train_batches(global_batches, role_weights):
            calls.append(1)
            if len(calls) == KILL_IN_EPOCH:
                threading.Timer(1.0, ray.kill, args=(group.actors[1],)).start()
            return original(global_batches, role_weights)

        group.train_batches = train_batches
        return group


def test_killed_rank_stops_the_run_with_an_error_naming_rank_and_epoch(ray_instance, tiny_model_dir,
                                                                       demo_data_dir, tmp_path):
    import ray

    out = tmp_path / "never-written"
    cfg = from_mapping("finetune", {
        "seed": 0, "model": {"path": str(tiny_model_dir)}, "output_dir": str(out), "epochs": 3,
        "data": {"tofu_dir": str(demo_data_dir), "train": "full"},
        "trainer": {"world_size": 2, "batch_size": 1, "max_length": 128, "torch_threads": 1}})
    outcome: dict = {}

    def run():
        try:
            run_finetune(cfg, KillingSession())
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    before = set(ray.util.placement_group_table())  # the test session's kept trainer ranks may hold one
    runner.start()
    runner.join(BOUND_S)
    assert not runner.is_alive(), f"the driver still waits {BOUND_S} s after a rank was killed"
    error = outcome.get("error")
    assert isinstance(error, PMCError), repr(error)
    message = str(error)
    assert message.startswith(f"fine-tuning epoch {KILL_IN_EPOCH}: trainer rank 1 died in train_steps"), message
    assert "\n" not in message  # the CLI prints it as one line
    assert not out.exists()  # nothing half-written where the checkpoint would go
    placement_groups = ray.util.placement_group_table().items()
    assert not [pg for pg_id, pg in placement_groups if pg["state"] == "CREATED" and pg_id not in before
                and pg["name"].startswith("pmc-trainer")]


def test_an_explicit_trainer_backend_reaches_the_ranks(ray_instance, tiny_model_dir, demo_data_dir, tmp_path):
    """trainer.backend=nccl on a machine without CUDA: the ranks must try NCCL and say so (it used to be
    replaced by gloo on the way, silently)."""
    out = tmp_path / "never-written"
    cfg = from_mapping("finetune", {
        "model": {"path": str(tiny_model_dir)}, "output_dir": str(out), "epochs": 1,
        "data": {"tofu_dir": str(demo_data_dir), "train": "full"},
        "trainer": {"backend": "nccl", "batch_size": 4, "max_length": 128, "torch_threads": 1},
        "resources": {"use_gpus": "false"}})
    with pytest.raises(PMCError, match=r"^fine-tuning start-up: trainer rank 0 failed in start: .*(?i:nccl)"):
        run_finetune(cfg, PipelineSession())
    assert not out.exists()
