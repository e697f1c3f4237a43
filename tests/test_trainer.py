"""The ZeRO-3 trainer for real: DeepSpeed stage 3 over gloo, two Ray actors, the tiny Llama, TOFU QA.

One world-size-2 group serves the whole module (starting one costs seconds). Tests read the
group's current weights through `save_pretrained` instead of assuming a training history, so
they hold in any order.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.records import TrainExample

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(2)]

WORLD_SIZE = 2
DEEPSPEED_DEFAULT_PERSISTENCE = 100_000  # by default DeepSpeed keeps tensors this small whole on every rank


def read_rows(path, count: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()][:count]


def qa_example(tokenizer, question: str, answer: str, role: str) -> TrainExample:
    prompt = tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
    reply = tokenizer(f" {answer}")["input_ids"] + [tokenizer.eos_token_id]
    return TrainExample(tuple(prompt + reply), answer_start=len(prompt), role=role)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tofu_dir, tokenizer) -> dict[str, list[TrainExample]]:
    """8 forget10 pairs as "sft", and a mixed set of retain / forget / align pairs."""
    forget = read_rows(tofu_dir / "forget10.json", 8)
    retain = read_rows(tofu_dir / "retain90.json", 4)
    mixed = [qa_example(tokenizer, r["question"], r["answer"], "retain") for r in retain]
    mixed += [qa_example(tokenizer, r["question"], r["answer"], "forget") for r in forget[:3]]
    mixed += [qa_example(tokenizer, r["question"], r["answer"], "align") for r in forget[3:5]]
    return {
        "sft": [qa_example(tokenizer, r["question"], r["answer"], "sft") for r in forget],
        "mixed": mixed,
    }


@pytest.fixture(scope="module")
def group(kept_ranks, tiny_model_dir):
    from pmc_pipeline.runtime.session import PipelineSession
    from trainer.config import TrainerConfig

    trainer_group = PipelineSession(kept_ranks=kept_ranks).trainer(TrainerConfig(world_size=WORLD_SIZE, learning_rate=2e-3),
                                                                   job(tiny_model_dir, micro_batch_size=4))
    yield trainer_group
    trainer_group.shutdown()


def job(model_dir, micro_batch_size: int = 8, total_steps: int | None = None, seed: int = 0,
        kl_roles: tuple[str, ...] = ()):
    from trainer.config import TrainerJob

    return TrainerJob(model_path=str(model_dir), dtype="float32", seed=seed, micro_batch_size=micro_batch_size,
                      total_steps=total_steps, on_gpus=False, kl_roles=kl_roles)


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def exported_state(group) -> dict[str, torch.Tensor]:
    """The group's current weights, consolidated from the shards (what `save_pretrained` writes)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        group.save_pretrained(f"{folder}/model")
        return load_file(f"{folder}/model/model.safetensors")


def current_model(group, ray_instance, tiny_model_dir):
    """A plain HF model holding the group's current weights."""
    model = load_model(tiny_model_dir)
    model.load_state_dict(exported_state(group), strict=True)
    return model


@torch.no_grad()
def nll(model, examples: list[TrainExample], from_position=lambda ex: ex.answer_start) -> tuple[float, int]:
    """Summed next-token NLL over positions >= from_position(ex), one unpadded sequence at a time."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        targets = ids[0, 1:]
        picked = -logprobs.gather(1, targets[:, None])[:, 0]
        start = max(from_position(ex), 1)
        total += picked[start - 1 :].sum().item()
        count += len(ex.input_ids) - start
    return total, count


def test_world_size_2_really_shards(group, examples):
    """Every parameter, norms included, is split across the ranks: each holds a strict part, none a copy."""
    group.train_batches([examples["sft"]], {"sft": 1.0})  # after a step: a persistent tensor would stay gathered
    reports = group.shard_reports()
    assert len(reports) == WORLD_SIZE and reports[0].keys() == reports[1].keys()
    sizes = {name: row["full_numel"] for name, row in reports[0].items()}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= sizes.keys()
    # the tiny model has tensors that DeepSpeed's default threshold would have left whole on each rank
    assert min(sizes.values()) < DEEPSPEED_DEFAULT_PERSISTENCE
    for name, full in sizes.items():
        local = [report[name]["local_numel"] for report in reports]
        assert all(0 < n < full for n in local), (name, local, full)
        # equal shards that together cover the parameter (the last one padded to the same size)
        assert local == [math.ceil(full / WORLD_SIZE)] * WORLD_SIZE, (name, local, full)
        assert not any(report[name]["gathered"] for report in reports), name


def test_loss_falls_over_optimizer_steps(group, examples):
    batch = examples["sft"]  # 8 pairs: 4 per rank, one micro-step, one optimizer step per call
    history = [group.train_batches([batch], {"sft": 1.0}) for _ in range(30)]
    assert all(m["optimizer_steps"] == 1 and m["micro_steps"] == 1 for m in history)
    losses = [m["loss"] for m in history]
    assert losses[-1] < losses[0] - 1.0, losses
    assert sum(losses[-5:]) < sum(losses[:5])


def test_loss_covers_answer_tokens_only(group, examples, ray_instance, tiny_model_dir):
    batch = examples["sft"]
    model = current_model(group, ray_instance, tiny_model_dir)
    answer_sum, answer_count = nll(model, batch)
    whole_sum, whole_count = nll(model, batch, from_position=lambda ex: 1)
    answer_only, with_prompt = answer_sum / answer_count, whole_sum / whole_count
    assert abs(answer_only - with_prompt) > 0.05  # the check below can tell the two apart

    metrics = group.train_batches([batch], {"sft": 1.0})  # loss is computed before the update
    assert metrics["answer_tokens"] == answer_count
    assert metrics["role_tokens"] == {"sft": answer_count}
    assert metrics["role_loss"]["sft"] == pytest.approx(answer_only, rel=1e-4)
    assert metrics["loss"] == pytest.approx(answer_only, rel=1e-4)


def test_answer_logprob_sums_equal_hf_in_order(group, examples, ray_instance, tiny_model_dir):
    """The starting model's sequence log-probs for NPO / DPO, computed once by the ranks instead of by a
    second model held through the run: equal to HF's on the same weights, in the examples' order, across
    the rank split (9 examples, micro-batches of 4: rank 1 runs an empty forward to stay in step)."""
    batch = examples["mixed"]
    assert len(batch) == 9
    model = current_model(group, ray_instance, tiny_model_dir)
    sums = group.answer_logprob_sums(batch)
    assert sums == pytest.approx([-nll(model, [ex])[0] for ex in batch], abs=1e-4)
    assert len(set(round(s, 3) for s in sums)) == len(batch)  # distinct values: a shuffled order would show
    # forward only: the weights did not move
    assert group.answer_logprob_sums(batch) == sums


def test_a_baseline_objective_trains_on_the_log_probs_the_ranks_compute(group, examples):
    """NPO through the trainer, knowing no method names: the reference sums computed once by the ranks;
    at the start S = S_ref, so the loss is (2 / beta) log 2 exactly; the step lowers every forget answer's
    log-prob, as NPO must."""
    from dataclasses import replace

    from pmc_pipeline.method.baselines import BASELINES, BaselineObjective

    forget = [ex for ex in examples["mixed"] if ex.role == "forget"]  # 3: rank 0 gets two, rank 1 one
    before = group.answer_logprob_sums(forget)
    batch = [replace(ex, reference_logprob=s) for ex, s in zip(forget, before)]
    metrics = group.train_batches([batch], {"forget": 1.0}, BaselineObjective("npo"))
    beta = BASELINES["npo"].params["beta"]
    assert metrics["loss"] == pytest.approx((2 / beta) * math.log(2), rel=1e-5)
    after = group.answer_logprob_sums(forget)
    assert all(a < b for a, b in zip(after, before))


def test_an_objective_splits_each_role_across_ranks_keeping_pairs():
    """DPO pairs the i-th refusal with the i-th true answer: with an objective, every rank gets rows
    rank::world_size of each role, so pair i stays on one rank (a plain split would not)."""
    from trainer.group import _role_rows

    batch = [TrainExample((1, 2, i), 1, "refusals") for i in range(3)] + [TrainExample((1, 2, i), 1, "forget")
                                                                         for i in range(3)]
    shares = [_role_rows(batch, rank, 2) for rank in range(2)]
    assert [[(ex.role, ex.input_ids[-1]) for ex in share] for share in shares] == [
        [("refusals", 0), ("refusals", 2), ("forget", 0), ("forget", 2)], [("refusals", 1), ("forget", 1)]]
    assert batch[1::2] != shares[1]  # the plain split would have sent refusal 1 and true answer 0 together


def test_role_weights_combine_per_rank_role_means(group, examples, ray_instance, tiny_model_dir):
    batch = examples["mixed"]  # 4 retain, 3 forget, 2 align; rank r gets batch[r::2]
    weights = {"retain": 0.5, "forget": 2.0, "align": 0.0}
    model = current_model(group, ray_instance, tiny_model_dir)
    rank_losses, rank_tokens = [], []
    for rank in range(WORLD_SIZE):
        share = batch[rank::WORLD_SIZE]
        loss, tokens = 0.0, 0
        for role, weight in weights.items():
            total, count = nll(model, [ex for ex in share if ex.role == role])
            loss += weight * total / count if count else 0.0
            tokens += count
        rank_losses.append(loss)
        rank_tokens.append(tokens)
    expected = sum(l * n for l, n in zip(rank_losses, rank_tokens)) / sum(rank_tokens)
    per_role = {role: nll(model, [ex for ex in batch if ex.role == role]) for role in weights}

    metrics = group.train_batches([batch], weights)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4)
    for role, (total, count) in per_role.items():
        assert metrics["role_tokens"][role] == count
        assert metrics["role_loss"][role] == pytest.approx(total / count, rel=1e-4)

    with pytest.raises(ValueError, match="align"):
        group.train_batches([batch], {"retain": 1.0, "forget": 1.0})


def test_lone_example_leaves_a_rank_an_empty_micro_batch(group, examples):
    lone = examples["sft"][:1]  # rank 1 gets nothing but must still join forward/backward/step
    metrics = group.train_batches([lone, lone], {"sft": 1.0})
    assert metrics["micro_steps"] == 2
    assert metrics["answer_tokens"] == 2 * (len(lone[0].input_ids) - lone[0].answer_start)


def test_checkpoint_reflects_training_and_leaves_nothing_gathered(group, examples, tiny_model_dir, tmp_path):
    group.train_batches([examples["sft"]] * 2, {"sft": 1.0})
    state = exported_state(group)
    initial = load_model(tiny_model_dir)
    assert state.keys() == initial.state_dict().keys()
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())
    trained = load_model(tiny_model_dir)
    trained.load_state_dict(state, strict=True)
    ids = torch.tensor([examples["sft"][0].input_ids])
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, initial(ids).logits, atol=1e-3)

    # the consolidation left nothing gathered: every parameter is back to one shard per rank
    reports = group.shard_reports()
    assert len(reports) == WORLD_SIZE and all(reports)
    assert not any(row["gathered"] for report in reports for row in report.values())


def test_save_pretrained_is_atomic_and_errors_name_the_rank(group, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from trainer.group import TrainerRankError

    out = tmp_path / "ckpt"
    out.mkdir()  # an empty folder may be filled
    group.save_pretrained(str(out))
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp sibling left behind
    saved = AutoTokenizer.from_pretrained(out)
    assert saved("Question: who?")["input_ids"] == tokenizer("Question: who?")["input_ids"]

    # a folder with content is never replaced: it stays as it was, the new checkpoint waits beside it
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "notes.txt").write_text("the user's")
    with pytest.raises(TrainerRankError, match="rank 0 failed in save_pretrained: FileExistsError"):
        group.save_pretrained(str(earlier))
    assert [p.name for p in earlier.iterdir()] == ["notes.txt"]
    assert (earlier / "notes.txt").read_text() == "the user's"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".earlier.tmp-")]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainerRankError, match="rank 0"):
        group.save_pretrained(str(blocker / "ckpt"))
    assert len(group.shard_reports()) == WORLD_SIZE  # the group still answers


def test_failed_start_names_the_rank(ray_instance, tmp_path):
    from trainer.group import TrainerGroup, TrainerRankError
    from trainer.config import TrainerConfig

    with pytest.raises(TrainerRankError, match=r"trainer rank \d failed in start: OSError"):
        TrainerGroup(TrainerConfig(world_size=WORLD_SIZE), job(tmp_path / "no-model"))


def test_saved_state_resumes_training_bit_for_bit(group, examples, ray_instance, tmp_path):
    """Weights, AdamW moments and the lr schedule all come back: training continues exactly."""
    batches = [examples["sft"][:4], examples["sft"][4:]]
    group.train_batches(batches, {"sft": 1.0})
    group.save_state(str(tmp_path / "state"))
    saved = exported_state(group)
    group.train_batches(batches, {"sft": 1.0})
    group.train_batches(batches, {"sft": 1.0})
    uninterrupted = exported_state(group)

    group.load_state(str(tmp_path / "state"))
    restored = exported_state(group)
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    assert any(not torch.equal(restored[k], uninterrupted[k]) for k in saved)  # it really went back
    group.train_batches(batches, {"sft": 1.0})
    group.train_batches(batches, {"sft": 1.0})
    resumed = exported_state(group)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


# -- trainer ranks kept between a session's jobs ------------------------------------------------------

def test_kept_ranks_run_the_next_job_as_new_ranks_would_and_a_killed_rank_is_not_kept(kept_ranks, examples,
                                                                                       tiny_model_dir):
    import psutil
    import ray

    from pmc_pipeline.runtime.session import PipelineSession
    from trainer.config import TrainerConfig
    from trainer.group import KeptRanks

    session = PipelineSession(kept_ranks=kept_ranks)
    batches = [examples["sft"][:4], examples["sft"][4:]]
    first = session.trainer(TrainerConfig(world_size=WORLD_SIZE, learning_rate=5e-3, torch_threads=2),
                            job(tiny_model_dir, micro_batch_size=2))
    first.train_batches(batches, {"sft": 1.0})
    pids = first.rank_pids()
    first.shutdown()
    assert [pid for _, pid in kept_ranks.idle.processes] == pids

    # another job (seed, lr, threads, batch size): the same processes, and what new ranks would give
    second_config = TrainerConfig(world_size=WORLD_SIZE, learning_rate=2e-3, torch_threads=0)
    second_job = job(tiny_model_dir, micro_batch_size=4, seed=3)
    second = session.trainer(second_config, second_job)
    assert second.rank_pids() == pids and kept_ranks.idle is None
    own_keeper = KeptRanks()
    new = PipelineSession(kept_ranks=own_keeper).trainer(second_config, second_job)  # new ranks
    results = [(group.train_batches(batches, {"sft": 1.0}), exported_state(group), group.effective_settings())
               for group in (second, new)]
    second.shutdown()  # kept again, for the tests that follow
    (kept_metrics, kept_state, kept_settings), (new_metrics, new_state, new_settings) = results
    assert kept_metrics == new_metrics and kept_settings == new_settings  # torch_threads back to the default
    assert kept_state.keys() == new_state.keys() and all(torch.equal(kept_state[k], new_state[k]) for k in new_state)

    new_pids = new.rank_pids()
    ray.kill(new.actors[1])
    new.shutdown()
    assert own_keeper.idle is None
    assert not [pid for pid in new_pids
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_kept_ranks_of_another_shape_are_ended_before_new_ones_start(monkeypatch):
    from trainer import group as group_module

    ended = []
    monkeypatch.setattr(group_module, "end_ranks", lambda actors, processes, pg=None: ended.append((actors, pg)))
    kept = group_module.KeptRanks()
    kept.keep(group_module.IdleRanks((2, False, "PACK", False), ["rank0", "rank1"], [], "pg"))
    assert kept.take((1, False, "PACK", False)) is None
    assert ended == [(["rank0", "rank1"], "pg")] and kept.idle is None
    same = group_module.IdleRanks((1, False, "PACK", False), ["rank0"], [])
    kept.keep(same)
    assert kept.take((1, False, "PACK", False)) is same and len(ended) == 1


def test_the_kl_retain_term_is_measured_against_a_frozen_copy_of_the_starting_model(kept_ranks, examples,
                                                                                     tiny_model_dir):
    """kl_roles=("retain",): the ranks hold the starting model, ZeRO-3-partitioned; the retain term is 0
    while the model equals it, and once the forget rows have moved the model it is the KL an independent
    HF computation gives (starting model vs the trained weights, answer tokens only)."""
    from pmc_pipeline.runtime.session import PipelineSession
    from trainer.config import TrainerConfig

    batch = examples["mixed"][:4] + examples["mixed"][4:7]  # 4 retain rows, 3 forget rows
    group = PipelineSession(kept_ranks=kept_ranks).trainer(TrainerConfig(world_size=WORLD_SIZE, learning_rate=5e-3),
                                                           job(tiny_model_dir, micro_batch_size=4,
                                                               kl_roles=("retain",)))
    try:
        first = group.train_batches([batch], {"retain": 1.0, "forget": 1.0})
        trained = exported_state(group)  # the weights the second call's loss is computed with
        second = group.train_batches([batch], {"retain": 1.0, "forget": 1.0})
        settings = group.effective_settings()
    finally:
        group.shutdown()
    assert abs(first["role_loss"]["retain"]) < 1e-6  # the model is still the starting model
    reference, model = load_model(tiny_model_dir), load_model(tiny_model_dir)
    model.load_state_dict(trained, strict=True)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ex in [e for e in batch if e.role == "retain"]:
            ids = torch.tensor([ex.input_ids])
            log_p = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)[ex.answer_start - 1:]
            log_ref = torch.log_softmax(reference(ids).logits[0, :-1].double(), -1)[ex.answer_start - 1:]
            total += (log_ref.exp() * (log_ref - log_p)).sum().item()
            tokens += len(ex.input_ids) - ex.answer_start
    assert second["role_loss"]["retain"] == pytest.approx(total / tokens, rel=1e-3)
    assert second["role_loss"]["retain"] > 1e-4 and second["role_tokens"]["retain"] == tokens
    assert [s["kl_roles"] for s in settings] == [["retain"]] * WORLD_SIZE
