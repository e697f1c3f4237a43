"""grad_accum > 1 at an epoch boundary, for real (DeepSpeed ZeRO-3 over gloo, Ray actors, the tiny Llama).

The rule (trainer/zero3.py `train_steps`): each `train_batches` call cuts its micro-batches into groups of
grad_accum from its first one and takes one optimizer step per group; a shorter last group gets its
step too, with the loss averaged over the micro-batches it holds. So an epoch of 4 micro-batches at
grad_accum 3 takes 2 steps (3 + 1), and the weights pushed to the rollout engine after the epoch are
the ones trained on all 4. Checked against AdamW in plain torch, one process, no DeepSpeed.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer.records import TrainExample

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(1, 2)]

GRAD_ACCUM = 3
MICRO_BATCHES = 4  # per epoch: one full accumulation of 3, then a partial one of 1
PER_RANK = 2  # examples per rank and micro-batch
LR, WEIGHT_DECAY, TOTAL_STEPS = 3e-3, 0.01, 20
# A small role weight keeps gradient norms under DeepSpeed's clipping threshold (1.0): clipping
# rescales every step to norm 1 and would hide a wrong loss scaling from Adam.
ROLE_WEIGHT = 0.05


def read_rows(path, count: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()][:count]


def qa_example(tokenizer, question: str, answer: str) -> TrainExample:
    prompt = tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
    reply = tokenizer(f" {answer}")["input_ids"] + [tokenizer.eos_token_id]
    return TrainExample(tuple(prompt + reply), answer_start=len(prompt), role="sft")


@pytest.fixture(scope="module", params=[1, 2], ids=["world1", "world2"])
def world_size(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def epochs(tofu_dir, tiny_model_dir, world_size) -> list[list[list[TrainExample]]]:
    """3 epochs of MICRO_BATCHES global micro-batches each, all different examples."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    per_batch, per_epoch = PER_RANK * world_size, MICRO_BATCHES * PER_RANK * world_size
    rows = read_rows(tofu_dir / "retain90.json", 3 * per_epoch)
    examples = [qa_example(tokenizer, r["question"], r["answer"]) for r in rows]
    return [[examples[e * per_epoch + b * per_batch: e * per_epoch + (b + 1) * per_batch] for b in range(MICRO_BATCHES)]
            for e in range(3)]


@pytest.fixture(scope="module")
def group(kept_ranks, tiny_model_dir, world_size):
    from pmc_pipeline.runtime.session import PipelineSession
    from trainer.config import TrainerConfig, TrainerJob

    config = TrainerConfig(world_size=world_size, learning_rate=LR, weight_decay=WEIGHT_DECAY, grad_accum=GRAD_ACCUM)
    trainer_group = PipelineSession(kept_ranks=kept_ranks).trainer(
        config, TrainerJob(model_path=str(tiny_model_dir), dtype="float32", seed=0, micro_batch_size=PER_RANK,
                           total_steps=TOTAL_STEPS, on_gpus=False))
    yield trainer_group
    trainer_group.shutdown()


def exported_state(group) -> dict[str, torch.Tensor]:
    """The group's current weights, consolidated from the shards (what `save_pretrained` writes)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        group.save_pretrained(f"{folder}/model")
        return load_file(f"{folder}/model/model.safetensors")


def answer_loss(model, examples: list[TrainExample]) -> torch.Tensor:
    """Mean next-token NLL over all answer tokens of `examples`, one unpadded sequence at a time."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        logits = model(ids).logits[0, :-1]
        targets = ids[0, 1:]
        start = max(ex.answer_start, 1) - 1  # logits[t] predicts token t + 1
        total = total + torch.nn.functional.cross_entropy(logits[start:], targets[start:], reduction="sum")
        count += len(targets) - start
    return total / count


def reference_run(tiny_model_dir, world_size: int, epochs, scale=None, drop_remainder=False) -> list[dict]:
    """Weights after each epoch, trained in plain torch the way the rule says.

    Per optimizer step: zero grads; for every micro-batch of the group, each rank's loss is the weight
    times its mean answer-token NLL; the gradient is averaged over ranks and over the group's
    micro-batches; clip at norm 1; AdamW (no decay on 1-D tensors); lr linear to 0 at TOTAL_STEPS.
    `scale(group_size)` and `drop_remainder` model the wrong rules the test must tell apart.
    """
    from transformers import AutoModelForCausalLM

    scale = scale or (lambda size: 1.0 / size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": WEIGHT_DECAY},
                                   {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}], lr=LR)
    states, step, pending = [], 0, []
    for batches in epochs:
        stream = pending + batches  # a carried-over remainder opens the next epoch's first group
        groups = [stream[i: i + GRAD_ACCUM] for i in range(0, len(stream), GRAD_ACCUM)]
        pending = groups.pop() if drop_remainder and len(groups[-1]) < GRAD_ACCUM else []
        for micro in groups:
            optimizer.zero_grad(set_to_none=True)
            for batch in micro:
                rank_losses = [answer_loss(model, batch[r::world_size]) for r in range(world_size)]
                loss = ROLE_WEIGHT * sum(rank_losses) / world_size
                (loss * scale(len(micro))).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for g in optimizer.param_groups:
                g["lr"] = LR * max(0.0, (TOTAL_STEPS - step) / TOTAL_STEPS)
            optimizer.step()
            step += 1
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Largest absolute difference over all weights, and the share of elements off by more than 1e-6."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    return diff.max().item(), (diff > 1e-6).double().mean().item()


def assert_same_training(trained, reference) -> None:
    """Equal to float32 noise. ZeRO-3 sums in its own order; Adam divides by sqrt(v), so an element whose
    gradient is near 0 turns that noise into a visible part of its step: a few elements (measured: < 1e-4
    of them, up to 0.007 of a step) differ more, none by a step's worth."""
    largest, share = differences(trained, reference)
    assert largest < LR / 30 and share < 1e-3, (largest, share)


def assert_other_training(trained, reference) -> None:
    """Far apart: a different rule moves most weights by a good part of an Adam step (measured: ~80 %, 0.5 LR)."""
    largest, share = differences(trained, reference)
    assert largest > LR / 5 and share > 0.3, (largest, share)


def test_partial_accumulation_steps_at_epoch_end_and_export_has_it(group, epochs, world_size, ray_instance,
                                                                   tiny_model_dir, tmp_path):
    """(a) 2 optimizer steps per epoch of 4 micro-batches at grad_accum 3, also in the second epoch
    (DeepSpeed's own micro-step counter would have put the second epoch's boundary elsewhere);
    (b) the weights equal plain-torch AdamW with each step averaged over the micro-batches it got;
    (c) the weights right after `train_batches` (what the PMC loop pushes next) hold the last micro-batch."""
    right = reference_run(tiny_model_dir, world_size, epochs[:2])
    wrong = {
        "scaled by 1/grad_accum": reference_run(tiny_model_dir, world_size, epochs[:2], scale=lambda n: 1 / GRAD_ACCUM),
        "remainder carried over": reference_run(tiny_model_dir, world_size, epochs[:2], drop_remainder=True),
    }
    for epoch in range(2):
        metrics = group.train_batches(epochs[epoch], {"sft": ROLE_WEIGHT})
        assert metrics["micro_steps"] == MICRO_BATCHES
        assert metrics["optimizer_steps"] == 2  # ceil(4 / 3): 3 + 1
        # the scheduler stepped with the optimizer, the partial step included
        assert metrics["lr"] == pytest.approx(LR * (TOTAL_STEPS - 2 * (epoch + 1)) / TOTAL_STEPS)
        pushed = exported_state(group)
        assert_same_training(pushed, right[epoch])
        for states in wrong.values():  # the test tells the rule from the wrong ones: each is far off
            assert_other_training(pushed, states[epoch])


def test_resume_is_bit_exact_with_partial_accumulations(group, epochs, ray_instance, tmp_path):
    """Every epoch ends on an optimizer step, so no gradient is pending when the state is saved."""
    group.train_batches(epochs[0], {"sft": ROLE_WEIGHT})
    group.save_state(str(tmp_path / "state"))
    saved = exported_state(group)
    group.train_batches(epochs[1], {"sft": ROLE_WEIGHT})
    group.train_batches(epochs[2], {"sft": ROLE_WEIGHT})
    uninterrupted = exported_state(group)

    group.load_state(str(tmp_path / "state"))
    assert all(torch.equal(v, saved[k]) for k, v in exported_state(group).items())
    assert any(not torch.equal(uninterrupted[k], saved[k]) for k in saved)  # it really went back
    group.train_batches(epochs[1], {"sft": ROLE_WEIGHT})
    last = group.train_batches(epochs[2], {"sft": ROLE_WEIGHT})
    assert last["optimizer_steps"] == 2
    resumed = exported_state(group)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
