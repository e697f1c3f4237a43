"""PMC variants for real (Ray + vLLM + DeepSpeed ZeRO-3) on the tiny demo model: PMC-alignment with
PMC-fast in one run, and a restart with Bradley-Terry selection in another. Short runs, shared engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pmc_pipeline.config import from_mapping
from pmc_pipeline.method.alignment import load_refusals
from pmc_pipeline.method.rewards import score
from pmc_pipeline.method.rewards.rouge_l import rouge_l_reward
from pmc_pipeline.recipes.unlearn import check_unlearn, run_unlearning
from pmc_pipeline.runtime.session import PipelineSession

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(1)]

MIN_LEN = 3


class RecordingSession(PipelineSession):
    """Records the prompts sent to vLLM (and what came back), greedy answers, and every train_batches call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled, self.greedy_calls, self.train_calls = [], [], []

    def rollout(self, model_source, *engine_args):
        client = super().rollout(model_source, *engine_args)
        sample, greedy = client.sample, client.greedy

        def recording_sample(prompt_ids, *args, **kwargs):
            rows = sample(prompt_ids, *args, **kwargs)
            self.sampled.append(([tuple(p) for p in prompt_ids], rows))
            return rows

        def recording_greedy(prompt_ids, *args, **kwargs):
            out = greedy(prompt_ids, *args, **kwargs)
            self.greedy_calls.append(out)
            return out

        client.sample, client.greedy = recording_sample, recording_greedy
        return client

    def trainer(self, config, job):
        group = super().trainer(config, job)
        train_batches = group.train_batches

        def recording_train_epoch(global_batches, role_weights):
            self.train_calls.append(([e for b in global_batches for e in b], dict(role_weights)))
            return train_batches(global_batches, role_weights)

        group.train_batches = recording_train_epoch
        return group


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(root: Path, lent: dict, demo_data_dir, model, epochs: int, pmc: dict, **settings):
    cfg = from_mapping("unlearn", {
        **settings, "seed": 0, "data": {"tofu_dir": str(demo_data_dir), "retain": "retain", "forget": "forget"},
        "model": {"path": str(model)}, "run_dir": str(root / "run"),
        "trainer": {"world_size": 1, "learning_rate": 1e-3, "batch_size": 4, "max_length": 128, "torch_threads": 1},
        "sampling": {"num_samples": 4, "temperature": 1.0, "top_p": 0.95, "max_tokens": 32},
        "pmc": {"epochs": epochs, "lambda_retain": 1.0, "min_len": MIN_LEN, "reference_max_tokens": 32, **pmc},
        "rollout": {"max_model_len": 512}})
    session = RecordingSession(**lent)
    inputs = check_unlearn(cfg)
    result = run_unlearning(cfg, session, inputs)
    return {"result": result, "session": session, "inputs": inputs,
            "metrics": _rows(result.run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def align_fast_run(tmp_path_factory, lent, demo_data_dir, finetuned_demo_model):
    return _run(tmp_path_factory.mktemp("align-fast"), lent, demo_data_dir, finetuned_demo_model,
                epochs=5, pmc={"fast": True, "lambda_align": 0.5})


@pytest.fixture(scope="module")
def align_fast_sequential_run(tmp_path_factory, lent, demo_data_dir, finetuned_demo_model):
    """align_fast_run with every chunk sampled before any is trained (pmc.overlap=false), reporting to
    all three trackers (W&B offline; MLflow in its default local store under tracking.dir)."""
    root = tmp_path_factory.mktemp("align-fast-sequential")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        return _run(root, lent, demo_data_dir, finetuned_demo_model, epochs=5,
                    pmc={"fast": True, "lambda_align": 0.5, "overlap": False},
                    report_to=["tensorboard", "mlflow", "wandb"], tracking={"dir": str(root / "tracking")})


@pytest.fixture(scope="module")
def restart_run(tmp_path_factory, lent, demo_data_dir, finetuned_demo_model):
    return _run(tmp_path_factory.mktemp("restart"), lent, demo_data_dir, finetuned_demo_model,
                # a hot tau: winners are often not the best sample, unlike argmax
                epochs=3, pmc={"restart_every": 2, "selection": "bradley_terry", "bt_tau": 0.5})


def _per_epoch(run) -> list[tuple[list[int], list]]:
    """The recorded vLLM sample calls grouped by epoch (its chunks in order, a chunk with nothing to
    sample makes no call): per epoch the question indices sent and the rows that came back."""
    formatter = run["inputs"].formatter
    prompts = [tuple(formatter.prompt_ids(q)) for q in run["inputs"].forget_questions]
    calls, epochs = iter(run["session"].sampled), []
    for line in run["metrics"]:
        questions, rows = [], []
        while len(questions) < line["prompts_sampled"]:
            sent, got = next(calls)
            questions += [prompts.index(p) for p in sent]
            rows += got
        epochs.append((questions, rows))
    assert next(calls, None) is None
    return epochs


def test_alignment_term_weight_is_logged_and_trained_with_and_falls_as_rewards_rise(align_fast_run):
    metrics, calls = align_fast_run["metrics"], iter(align_fast_run["session"].train_calls)
    refusals = set(load_refusals())
    formatter = align_fast_run["inputs"].formatter
    assert len(metrics) == 5
    checked_refusals = 0
    for line in metrics:
        assert len(line["align_weights"]) == len(line["chunk_gammas"]) == len(line["chunk_trained_questions"]) > 1
        for trained, gamma, weight in zip(line["chunk_trained_questions"], line["chunk_gammas"], line["align_weights"]):
            if not trained:
                continue  # a chunk with no winner makes no trainer call
            examples, role_weights = next(calls)
            assert weight == pytest.approx(0.5 * (1 - gamma))  # gamma of this chunk's winners
            assert role_weights.get("align", 0.0) == pytest.approx(weight)
            align = [e for e in examples if e.role == "align"]
            # one (forget question, refusal) example per trained question while the weight is > 0, none at 0
            assert len([e for e in examples if e.role == "forget"]) == trained
            assert len(align) == (trained if weight > 0 else 0)
            for example in align:
                answer = formatter.tokenizer.decode(example.input_ids[example.answer_start:], skip_special_tokens=True)
                assert answer.strip() in refusals
            checked_refusals += len(align)
        # the term is trained (and its loss logged) exactly while a weight is > 0 (gamma < 1; the
        # weight formula makes it 0 at gamma 1, as tests/test_variants.py shows on scripted rewards)
        assert (line["loss_align"] is None) == (max(line["align_weights"]) == 0.0)
    assert next(calls, None) is None
    assert checked_refusals > 0
    assert metrics[0]["gamma"] < 1 and max(metrics[0]["align_weights"]) > 0
    assert metrics[-1]["gamma"] > metrics[0]["gamma"]
    assert sum(metrics[-1]["align_weights"]) < sum(metrics[0]["align_weights"])


def test_fast_sends_only_unconverged_questions_to_vllm(align_fast_run):
    """A question goes to vLLM in epoch e iff none of its samples in epochs < e reached reward 1."""
    result, metrics = align_fast_run["result"], align_fast_run["metrics"]
    formatter = align_fast_run["inputs"].formatter
    converged: set[int] = set()
    for line, (questions, rows) in zip(metrics, _per_epoch(align_fast_run)):
        expected = sorted(set(range(len(align_fast_run["inputs"].forget_questions))) - converged)
        assert line["prompts_sampled"] == len(expected), line["epoch"]
        assert sorted(questions) == expected, line["epoch"]
        if not questions:
            continue
        texts = [[formatter.decode(c.token_ids) for c in row] for row in rows]
        rewards = score(rouge_l_reward, [result.references[q] for q in questions], texts, MIN_LEN)
        converged |= {q for q, best in zip(questions, rewards.max(axis=1)) if best >= 1.0 - 1e-9}
    sampled = [line["prompts_sampled"] for line in metrics]
    assert sampled == sorted(sampled, reverse=True) and sampled[-1] < sampled[0], sampled
    assert metrics[-1]["generated_tokens"] < metrics[0]["generated_tokens"]


def test_restart_replaces_the_references_with_the_current_models_greedy_answers(restart_run):
    session, result, metrics = restart_run["session"], restart_run["result"], restart_run["metrics"]
    formatter = restart_run["inputs"].formatter
    assert [line.get("restart") for line in metrics] == [None, "every", None]
    assert len(session.greedy_calls) == 2  # the original references, then the restart's
    original, restarted = ([formatter.decode(c.token_ids) for c in call] for call in session.greedy_calls)
    assert result.references == restarted and restarted != original
    # epoch 3 is scored against the new references
    questions, rows = _per_epoch(restart_run)[2]
    texts = [[formatter.decode(c.token_ids) for c in row] for row in rows]
    assert metrics[2]["reward_mean_all"] == pytest.approx(
        float(score(rouge_l_reward, [restarted[q] for q in questions], texts, MIN_LEN).mean()))
    assert all(line["selection"] == "bradley_terry" and line["reward"] == "rouge_l" for line in metrics)


def test_bradley_terry_really_draws_winners_below_the_best_and_argmax_never_does(restart_run, align_fast_run):
    """`selected_below_best` counts them; reward_mean (the winners' mean reward), checked against the
    rewards recomputed from the recorded samples, independently says whether there were any."""
    session, metrics = restart_run["session"], restart_run["metrics"]
    formatter = restart_run["inputs"].formatter
    original, restarted = ([formatter.decode(c.token_ids) for c in call] for call in session.greedy_calls)
    assert len(metrics) == 3
    for line, (questions, rows), references in zip(metrics, _per_epoch(restart_run), [original, original, restarted]):
        texts = [[formatter.decode(c.token_ids) for c in row] for row in rows]
        best = score(rouge_l_reward, [references[q] for q in questions], texts, MIN_LEN).max(axis=1)
        assert line["reward_mean"] <= best.mean() + 1e-9
        assert (line["reward_mean"] < best.mean() - 1e-9) == (line["selected_below_best"] > 0), line
    assert sum(line["selected_below_best"] for line in metrics) > 0
    assert [line["selected_below_best"] for line in align_fast_run["metrics"]] == [0] * 5  # argmax


def _overlapping(timeline: list) -> bool:
    """Whether an engine span (rollout) and a trainer span of one epoch's timeline intersect."""
    rollouts = [(start, end) for phase, start, end in timeline if phase == "rollout"]
    trains = [(start, end) for phase, start, end in timeline if phase == "train"]
    return any(r0 < t1 and t0 < r1 for r0, r1 in rollouts for t0, t1 in trains)


def test_overlapped_and_sequential_chunks_give_bit_identical_weights_and_metrics(align_fast_run,
                                                                                 align_fast_sequential_run):
    from safetensors.torch import load_file

    weights = [load_file(next((run["result"].run_dir / "checkpoint-final").glob("*.safetensors")))
               for run in (align_fast_run, align_fast_sequential_run)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    def untimed(line: dict) -> dict:
        return {k: v for k, v in line.items() if "seconds" not in k and k not in ("timeline", "overlap")}

    overlapped, sequential = align_fast_run["metrics"], align_fast_sequential_run["metrics"]
    assert [untimed(line) for line in overlapped] == [untimed(line) for line in sequential]
    assert align_fast_run["session"].train_calls == align_fast_sequential_run["session"].train_calls
    # the schedules really differ: the engine sampled a later chunk while the trainer trained an earlier one
    assert _overlapping(overlapped[0]["timeline"]) and overlapped[0]["overlap"]
    assert not any(_overlapping(line["timeline"]) or line["overlap"] for line in sequential)


def test_trackers_hold_every_number_of_every_metrics_line(align_fast_sequential_run):
    from tracked_values import mlflow_values, tensorboard_values, wandb_values

    from pmc_pipeline.tracking import numeric

    run_dir = align_fast_sequential_run["result"].run_dir
    tracking = run_dir.parent / "tracking"
    lines = align_fast_sequential_run["metrics"]
    expected: dict[str, dict[int, float]] = {}
    for line in lines:
        for key, value in numeric(line).items():
            expected.setdefault(key, {})[line["epoch"]] = value
    assert {"reward_mean", "loss_forget", "gamma", "seconds_epoch", "converged_questions"} <= set(expected)

    def assert_same(tracked: dict[str, dict[int, float]], summary_prefix: str) -> None:
        tracked = {k: v for k, v in tracked.items() if not k.startswith(summary_prefix)}
        assert set(tracked) == set(expected)
        for key, by_epoch in expected.items():  # TensorBoard keeps float32
            assert tracked[key] == pytest.approx(by_epoch, rel=1e-6), key

    scalars, config_text = tensorboard_values(tracking / "tensorboard" / f"unlearn-{run_dir.name}")
    assert_same(scalars, "summary/")
    assert "pmc.lambda_align: 0.5" in config_text
    metrics, params, tags = mlflow_values(f"file:{tracking / 'mlruns'}", "pmc")
    assert_same(metrics, "summary.")
    assert params["pmc.overlap"] == "False" and tags["summary.checkpoint"] == str(run_dir / "checkpoint-final")
    history, config, summary = wandb_values(tracking / "wandb")
    assert_same(history, "\0")
    assert summary["checkpoint"] == str(run_dir / "checkpoint-final")
    # no text of a forget question or a sample reaches a tracker
    questions = align_fast_sequential_run["inputs"].forget_questions
    stored = config_text + str(params) + str(tags) + str(config) + str(summary)
    assert not any(q in stored for q in questions)
