"""`pmc unlearn method=<baseline>` for real (Ray + DeepSpeed ZeRO-3 + vLLM for the evaluations) on the tiny
demo model: every one of the paper's six baselines runs 3 epochs from the fine-tuned checkpoint and the
forget recall falls; what each trains on, the starting model's log-probs it compares with, and the
privacy record of a method that trains on the true forget answers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pmc_pipeline.config import from_mapping
from pmc_pipeline.errors import PMCError
from pmc_pipeline.method.baselines import BASELINES
from pmc_pipeline.method.config import BASELINE_NAMES
from pmc_pipeline.recipes.unlearn import check_unlearn, run_unlearning
from pmc_pipeline.runtime.checkpoints import load_loop_state
from pmc_pipeline.runtime.session import PipelineSession

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(1)]

EPOCHS = 3


class RecordingSession(PipelineSession):
    """Records every global batch the trainer is given, and whether an engine was asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.engines = [], 0

    def rollout(self, *args, **kwargs):
        self.engines += 1
        return super().rollout(*args, **kwargs)

    def trainer(self, config, job):
        group = super().trainer(config, job)
        train_batches = group.train_batches

        def recording(global_batches, role_weights, objective=None):
            self.batches += [list(batch) for batch in global_batches]
            return train_batches(global_batches, role_weights, objective)

        group.train_batches = recording
        return group


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _config(demo_data_dir: Path, model: Path, run_dir: Path, method: str, **overrides) -> object:
    settings = {
        "seed": 0, "method": method, "model": {"path": str(model)}, "run_dir": str(run_dir),
        "data": {"tofu_dir": str(demo_data_dir), "forget": "forget", "retain": "retain"},
        "trainer": {"world_size": 1, "learning_rate": 2e-3, "batch_size": 4, "max_length": 128, "torch_threads": 1},
        "baseline": {"epochs": EPOCHS},
        "evaluation": {"eval_every": EPOCHS, "max_tokens": 32},
        "checkpoint_every": EPOCHS if method == "npo" else 0,  # NPO's loop state holds its reference log-probs
        "rollout": {"max_model_len": 512}}
    settings.update(overrides)
    return from_mapping("unlearn", settings)


@pytest.fixture(scope="module")
def baseline_runs(tmp_path_factory, lent, demo_data_dir, finetuned_demo_model, caplog_module) -> dict:
    root = tmp_path_factory.mktemp("baselines")
    runs = {}
    for method in BASELINE_NAMES:
        # GD runs as GD-KL: its retain term is the KL from the starting model (retain_loss: kl)
        extra = {"retain_loss": "kl"} if method == "gd" else {}
        cfg = _config(demo_data_dir, finetuned_demo_model, root / method, method, **extra)
        session = RecordingSession(**lent)
        caplog_module.clear()
        result = run_unlearning(cfg, session, check_unlearn(cfg))
        runs[method] = {"result": result, "session": session, "log": caplog_module.text}
    return runs


@pytest.fixture(scope="module")
def caplog_module():
    """A module-wide log capture (pytest's caplog is per test)."""
    handler = _ListHandler()
    logger = logging.getLogger("pmc_pipeline")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def clear(self) -> None:
        self.lines = []

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def test_the_registry_holds_the_six_names_the_config_accepts():
    assert tuple(BASELINES) == BASELINE_NAMES


@pytest.mark.parametrize("method", BASELINE_NAMES)
def test_every_baseline_lowers_forget_recall(baseline_runs, method):
    run_dir = baseline_runs[method]["result"].run_dir
    before = json.loads((run_dir / "eval_before.json").read_text())
    lines = _rows(run_dir / "metrics.jsonl")
    assert [line["epoch"] for line in lines] == list(range(1, EPOCHS + 1))
    assert all(line["method"] == method and line["trained_questions"] == 12 for line in lines)
    assert before["eval_forget"] > 0.6, "the fine-tuned model should have memorised the forget answers"
    assert lines[-1]["eval_forget"] < before["eval_forget"] - 0.2, (before["eval_forget"], lines[-1]["eval_forget"])


def test_training_rows_follow_each_method(baseline_runs, demo_data_dir, finetuned_demo_model):
    answers = {r["answer"] for r in _rows(demo_data_dir / "forget.json")}
    for method, run in baseline_runs.items():
        rows = [ex for batch in run["session"].batches for ex in batch]
        roles = {ex.role for ex in rows}
        expected = set(BASELINES[method].reads) | ({"retain"} if BASELINES[method].lambda_retain else set())
        assert roles == expected, method
        assert sum(ex.role == BASELINES[method].reads[0] for ex in rows) == 12 * EPOCHS
        assert run["session"].engines == 1  # the evaluations' engine only; training samples nothing
    # IDK never sees a true forget answer; DPO's refusal and true answer of one question share a batch
    formatter = check_unlearn(_config(demo_data_dir, finetuned_demo_model, Path("/nonexistent"), "idk")).formatter
    idk_texts = [formatter.tokenizer.decode(ex.input_ids[ex.answer_start:])
                 for batch in baseline_runs["idk"]["session"].batches for ex in batch if ex.role == "refusals"]
    assert idk_texts and not any(answer in text for answer in answers for text in idk_texts)
    for batch in baseline_runs["dpo"]["session"].batches:
        prompts = [ex.input_ids[:ex.answer_start] for ex in batch]
        winners = [p for p, ex in zip(prompts, batch) if ex.role == "refusals"]
        losers = [p for p, ex in zip(prompts, batch) if ex.role == "forget"]
        assert winners == losers


def test_reference_logprobs_are_the_starting_models_in_float32(baseline_runs, finetuned_demo_model, demo_data_dir):
    """NPO's S_ref, computed once before epoch 1, equals a frozen copy of the starting model scoring the same
    rows (the on-the-fly reference OpenUnlearning keeps through the run)."""
    from transformers import AutoModelForCausalLM

    run = baseline_runs["npo"]
    state = load_loop_state(run["result"].run_dir, EPOCHS)
    cfg = _config(demo_data_dir, finetuned_demo_model, Path("/nonexistent"), "npo")
    inputs = check_unlearn(cfg)
    model = AutoModelForCausalLM.from_pretrained(finetuned_demo_model, torch_dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for question, answer in zip(inputs.forget_questions, inputs.forget_answers):
            ex = inputs.formatter.example(question, answer, "forget", cfg.trainer.max_length)
            ids = torch.tensor([ex.input_ids])
            logprobs = torch.log_softmax(model(ids).logits.float()[0, :-1], -1)
            targets = ids[0, 1:]
            expected.append(logprobs[torch.arange(len(targets)), targets][ex.answer_start - 1:].sum().item())
    assert state["reference_sums"]["forget"] == pytest.approx(expected, abs=1e-4)
    assert min(expected) < -1.0  # real log-probs, not zeros


def test_gd_kl_holds_the_starting_model_and_the_others_do_not(baseline_runs):
    for method, run in baseline_runs.items():
        roles = json.loads((run["result"].run_dir / "roles.json").read_text())
        assert [rank["kl_roles"] for rank in roles["trainer_ranks"]] == [["retain"] if method == "gd" else []]


def test_training_on_true_answers_is_logged_and_recorded(baseline_runs):
    for method, run in baseline_runs.items():
        summary = json.loads((run["result"].run_dir / "summary.json").read_text())
        card = (run["result"].checkpoint / "README.md").read_text()
        on_answers = BASELINES[method].trains_on_forget_answers
        assert summary["method"] == method and summary["trains_on_forget_answers"] is on_answers
        assert sum("trains on" in line for line in run["log"].splitlines()) == 1
        if on_answers:
            assert "ground-truth answers" in run["log"] and "ground-truth answers" in card
        else:
            assert "refusal lines" in run["log"] and "not on the forget questions' true answers" in card
        assert f"method: {method}" in card and "baseline.epochs 3" in card


def test_a_baseline_that_trains_on_forget_answers_refuses_questions_only(tmp_path, demo_data_dir, tiny_model_dir):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": r["question"]}) + "\n"
                                 for r in _rows(demo_data_dir / "forget.json")))
    cfg = _config(demo_data_dir, tiny_model_dir, tmp_path / "run", "npo",
                  data={"tofu_dir": str(demo_data_dir), "forget": str(questions), "retain": "retain"})
    with pytest.raises(PMCError, match="method=npo trains on the forget questions' ground-truth answers.*answer"):
        check_unlearn(cfg)
    idk = _config(demo_data_dir, tiny_model_dir, tmp_path / "run", "idk", evaluation={"eval_every": 0},
                  data={"tofu_dir": str(demo_data_dir), "forget": str(questions), "retain": "retain"})
    assert check_unlearn(idk).forget_answers is None  # IDK needs the questions only


def test_settings_a_method_does_not_take_are_refused(tmp_path, demo_data_dir, tiny_model_dir):
    cfg = _config(demo_data_dir, tiny_model_dir, tmp_path / "run", "ga", baseline={"epochs": 1, "beta": 0.1})
    with pytest.raises(PMCError, match=r"baseline.beta=0.1: method=ga takes no beta or delta"):
        check_unlearn(cfg)
    with pytest.raises(Exception, match="method='sgd' is not allowed"):
        _config(demo_data_dir, tiny_model_dir, tmp_path / "run", "sgd")


def test_a_resumed_baseline_run_ends_on_the_uninterrupted_runs_weights(baseline_runs, tmp_path, lent, demo_data_dir,
                                                                       finetuned_demo_model):
    """NPO finished at epoch 2 and continued to epoch 3 (`baseline.epochs` may change on resume): the
    reference log-probs, refusal draws and generator come back from the checkpoint's loop state, so the
    weights equal the fixture's uninterrupted 3-epoch run bit for bit; the 2-epoch model is kept aside."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "npo"
    first = _config(demo_data_dir, finetuned_demo_model, run_dir, "npo", baseline={"epochs": 2},
                    checkpoint_every=1)
    run_unlearning(first, PipelineSession(**lent), check_unlearn(first))
    resumed = _config(demo_data_dir, finetuned_demo_model, tmp_path / "unused", "npo", checkpoint_every=1,
                      resume=str(run_dir))
    result = run_unlearning(resumed, PipelineSession(**lent), check_unlearn(resumed))
    assert [line["epoch"] for line in _rows(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert (run_dir / "checkpoint-final.epoch-2" / "model.safetensors").is_file()  # the earlier end, kept
    straight = load_file(str(baseline_runs["npo"]["result"].checkpoint / "model.safetensors"))
    weights = load_file(str(result.checkpoint / "model.safetensors"))
    assert straight.keys() == weights.keys()
    assert [k for k in straight if not torch.equal(straight[k], weights[k])] == []
