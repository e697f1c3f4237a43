"""One full fine-tune + `pmc unlearn` run on a tiny model: Ray + vLLM + DeepSpeed ZeRO-3 (world size 2).

Shares the session's Ray instance and vLLM engine (the run loads its checkpoints into that engine).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pmc_pipeline.config import from_mapping
from pmc_pipeline.eval.metrics import greedy_answers
from pmc_pipeline.method.rewards.rouge_l import rouge_l_recall
from pmc_pipeline.recipes.unlearn import check_unlearn, run_unlearning
from pmc_pipeline.runtime.session import PipelineSession

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(2)]


class RecordingSession(PipelineSession):
    """Records every example any trainer is given, to prove what reaches the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_examples = []

    def trainer(self, config, job):
        group = super().trainer(config, job)
        original = group.train_batches

        def recording_train_epoch(global_batches, role_weights):
            self.trained_examples += [e for batch in global_batches for e in batch]
            return original(global_batches, role_weights)

        group.train_batches = recording_train_epoch
        return group


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pmc_run(tmp_path_factory, lent, demo_data_dir, finetuned_demo_model):
    root = tmp_path_factory.mktemp("e2e")
    forget_rows = _rows(demo_data_dir / "forget.json")
    # the forget set given to `unlearn` holds questions only: the method never needs the answers
    questions_only = root / "forget_questions.jsonl"
    questions_only.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in forget_rows))

    unlearn_cfg = from_mapping("unlearn", {
        "seed": 0, "data": {"tofu_dir": str(demo_data_dir), "retain": "retain", "forget": str(questions_only)},
        "model": {"path": str(finetuned_demo_model)}, "run_dir": str(root / "run"),
        "trainer": {"world_size": 2, "learning_rate": 3e-4, "batch_size": 2, "max_length": 128, "torch_threads": 1},
        "sampling": {"num_samples": 4, "temperature": 1.0, "top_p": 0.95, "max_tokens": 40},
        "pmc": {"epochs": 6, "lambda_retain": 1.0, "min_len": 3, "reference_max_tokens": 40},
        "rollout": {"max_model_len": 512}})

    session = RecordingSession(**lent)
    inputs = check_unlearn(unlearn_cfg)
    rollout = session.rollout(inputs.model_source, None, "float32", 0)
    questions, answers = [r["question"] for r in forget_rows], [r["answer"] for r in forget_rows]
    before = rouge_l_recall(answers, greedy_answers(rollout, inputs.formatter, questions, 40)).mean()
    result = run_unlearning(unlearn_cfg, session, inputs)
    after = rouge_l_recall(answers, greedy_answers(rollout, inputs.formatter, questions, 40)).mean()
    return {"result": result, "before": before, "after": after, "session": session, "inputs": inputs,
            "forget_rows": forget_rows, "rollout": rollout, "root": root}


def test_metrics_have_one_line_per_epoch_with_every_field(pmc_run):
    lines = _rows(pmc_run["result"].run_dir / "metrics.jsonl")
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]
    for line in lines:
        for key in ("reward_mean", "reward_max", "loss", "loss_forget", "loss_retain", "prompts_sampled",
                    "seconds_rollout", "seconds_reward", "seconds_train", "seconds_weight_push"):
            assert line[key] is not None, key
        assert line["prompts_sampled"] == 12 and line["samples"] == 48
        assert line["selected_below_best"] == 0  # argmax: every winner is its question's best sample


def test_selected_reward_rises_and_forget_recall_falls(pmc_run):
    rewards = [line["reward_mean"] for line in _rows(pmc_run["result"].run_dir / "metrics.jsonl")]
    assert np.mean(rewards[-2:]) > rewards[0]
    before, after = pmc_run["before"], pmc_run["after"]
    assert before > 0.6, "the fine-tuned model should have memorised the forget answers"
    assert after < before - 0.2


def test_ground_truth_forget_answers_never_reach_the_trainer(pmc_run):
    formatter = pmc_run["inputs"].formatter
    examples = pmc_run["session"].trained_examples
    forget_examples = [e for e in examples if e.role == "forget"]
    assert forget_examples and {e.role for e in examples} == {"forget", "retain"}
    trained_texts = [formatter.tokenizer.decode(e.input_ids[e.answer_start:]) for e in examples]
    assert len(pmc_run["forget_rows"]) == 12
    for row in pmc_run["forget_rows"]:
        assert not any(row["answer"] in text for text in trained_texts)


def test_final_checkpoint_loads_and_matches_the_pushed_engine(pmc_run):
    """The trainer's final weights under HF generate == the vLLM engine they were pushed into."""
    checkpoint = pmc_run["result"].checkpoint
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    formatter = pmc_run["inputs"].formatter
    questions = [r["question"] for r in pmc_run["forget_rows"][:4]]
    long_question = " ".join(r["question"] for r in pmc_run["forget_rows"])  # > one 128-token KV block
    prompts = [formatter.prompt_ids(q) for q in questions + [long_question]]
    assert len(prompts[-1]) > 128
    engine = pmc_run["rollout"].greedy(prompts, 24)
    assert len(engine) == len(prompts)
    for prompt, completion in zip(prompts, engine):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        hf_tokens = _until_eos(out[0, len(prompt):].tolist(), tokenizer.eos_token_id)
        assert _until_eos(list(completion.token_ids), tokenizer.eos_token_id) == hf_tokens
    summary = json.loads((pmc_run["result"].run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["epochs"] == 6
