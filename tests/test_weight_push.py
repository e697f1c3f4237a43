"""The weight push through vLLM's weight-transfer protocol (our gloo backend), streamed from the ZeRO-3
shards: 2 trainer ranks and 2 engines of their own, placed the way `pmc unlearn` places them.

- after each of several training epochs, every engine's greedy answers equal HF `generate` on the
  weights consolidated from the shards (float32, token for token);
- with a ~170 MB model and an 8 MiB bucket, rank 0's memory grows by less than the model during a
  push (the blob path it replaced held the whole state dict and its serialised copy);
- an engine killed during a push stops it with one error naming the engine, within a bound.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from pmc_pipeline.config import from_mapping
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.models.source import load_tokenizer
from pmc_pipeline.recipes.roles import open_session, trainer_job
from hf_reference import hf_greedy

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(2, 2)]

MAX_TOKENS = 16
KILL_BOUND_S = 30.0  # an engine killed mid-push: the push fails within this (Ray reports the death, gloo the peer)


def rows(tofu_dir, split: str, count: int) -> list[dict]:
    lines = (tofu_dir / f"{split}.json").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


@contextlib.contextmanager
def connected_roles(cfg, kept_ranks, micro_batch_size: int, kill: bool = False):
    """The engines `cfg` places, started the way `pmc unlearn` starts them, and trainer ranks (the test
    session's kept ones when they fit), joined by one transfer group; `kill`: end them at once
    afterwards (a test killed one of them)."""
    session = open_session(cfg, kept_ranks=kept_ranks)
    trainer = None
    try:
        rollout = session.rollout(cfg.model.path, cfg.rollout, "float32", 0)
        trainer = session.trainer(cfg.trainer, trainer_job(cfg, cfg.model.path, micro_batch_size, None))
        session.connect_weight_push(trainer, rollout, cfg.rollout)
        yield rollout, trainer
    finally:
        if trainer is not None:
            trainer.shutdown(kill=kill)
        session.close(abort=kill)


@pytest.fixture(scope="module")
def roles(kept_ranks, tiny_model_dir, tmp_path_factory):
    """2 engines and a 2-rank trainer on the tiny model."""
    cfg = from_mapping("unlearn", {
        "model": {"path": str(tiny_model_dir)}, "run_dir": str(tmp_path_factory.mktemp("push") / "unused"),
        "trainer": {"world_size": 2, "learning_rate": 2e-3, "batch_size": 2, "max_length": 128, "torch_threads": 1},
        "rollout": {"max_model_len": 512}, "resources": {"rollout_engines": 2}})
    with connected_roles(cfg, kept_ranks, micro_batch_size=4) as roles:
        yield roles


def test_every_engine_answers_like_the_consolidated_weights_after_each_push(roles, tiny_model_dir, tofu_dir,
                                                                            tmp_path, ray_instance):
    rollout, trainer = roles
    formatter = PromptFormatter(load_tokenizer(str(tiny_model_dir)), "plain")
    train = [formatter.example(r["question"], r["answer"], "sft", 128) for r in rows(tofu_dir, "retain90", 16)]
    prompts = [formatter.prompt_ids(r["question"]) for r in rows(tofu_dir, "forget10", 6)]
    before = [c.token_ids for c in rollout.greedy(prompts, MAX_TOKENS)]
    for epoch in range(3):
        trainer.train_batches([train[i:i + 4] for i in range(0, len(train), 4)], {"sft": 1.0})
        pushed = trainer.push_weights()
        assert pushed["bytes"] > 0 and pushed["seconds"] > 0
        trainer.save_pretrained(str(tmp_path / f"epoch-{epoch}"))
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"epoch-{epoch}", dtype=torch.float32).eval()
        expected = hf_greedy(model, prompts, MAX_TOKENS)
        for engine, actor in enumerate(rollout.actors):
            answers = [c.token_ids for c in ray_instance.get(actor.greedy.remote(prompts, MAX_TOKENS))]
            assert answers == expected, f"engine {engine} after push {epoch + 1}"
    assert expected != before  # the training moved the answers, so the pushes carried something


@pytest.fixture(scope="module")
def large_model(tmp_path_factory, tofu_dir):
    """A random-init Llama of ~170 MB (6 layers of ~28 MB), larger than the push's 8 MiB bucket."""
    from pmc_pipeline.models.tiny import TinyModelSpec, build_tiny_model

    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows(tofu_dir, "retain90", 400)]
    spec = TinyModelSpec(vocab_size=1024, hidden_size=768, intermediate_size=2048, num_layers=6, num_heads=12)
    return build_tiny_model(texts, tmp_path_factory.mktemp("large") / "model", spec)


def test_a_streamed_push_holds_far_less_than_the_model_and_a_killed_engine_ends_it(ray_instance, kept_ranks,
                                                                                    large_model, tmp_path):
    from trainer.group import TrainerRankError

    cfg = from_mapping("unlearn", {
        "model": {"path": str(large_model)}, "run_dir": str(tmp_path / "unused"),
        "trainer": {"world_size": 2, "torch_threads": 1},
        "rollout": {"max_model_len": 256, "weight_bucket_mb": 8, "weight_push_timeout_s": 120}})
    with connected_roles(cfg, kept_ranks, micro_batch_size=2, kill=True) as (rollout, trainer):
        first = trainer.push_weights()
        print(f"\npush of {first['bytes'] / 2**20:.0f} MiB in {first['seconds']:.2f} s; rank 0 grew by "
              f"{first['peak_rss_growth_bytes'] / 2**20:.0f} MiB")
        assert first["bytes"] > 100 * 2**20
        assert first["peak_rss_growth_bytes"] < first["bytes"]

        killed_at = []

        def kill_soon() -> None:
            time.sleep(0.2 * first["seconds"])  # inside the push (it takes as long as the first one)
            ray_instance.kill(rollout.actors[0])
            killed_at.append(time.perf_counter())

        killer = threading.Thread(target=kill_soon)
        killer.start()
        with pytest.raises(TrainerRankError) as failure:
            trainer.push_weights()
        stopped = time.perf_counter()
        killer.join()
        print(f"engine killed during a push: the push failed {stopped - killed_at[0]:.1f} s later: {failure.value}")
        assert "rollout engine 0" in str(failure.value) and "\n" not in str(failure.value)
        assert stopped - killed_at[0] < KILL_BOUND_S
