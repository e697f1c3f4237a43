"""`pmc bench`'s figure-producing code: reward and rollout sections, the reference-style epoch, the
report and the command's bad-input errors. Speeds are never asserted; only that every figure exists
with min <= median <= max over its repeats and that the correctness checks really compare."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pmc_pipeline.bench.figures import BenchReport, markdown_table
from pmc_pipeline.bench.reward_section import bench_reward, compare_scores, make_workload, rouge_score_recall
from pmc_pipeline.cli import main
from pmc_pipeline.method.rewards.rouge_l import rouge_l_recall

ANSWERS = ["The author was born in Kuwait City in 1932.", "Her novels won the Hugo Award twice!",
           "He writes non-fiction about running, runners and races.", "Zürich, 3.5 million copies sold."]

pytestmark = pytest.mark.trainer_world(1)  # its engine tests lend the kept ranks


def _assert_summarised(report: BenchReport, name: str, repeats: int) -> None:
    summary = report.as_dict()["figures"][name]
    assert len(summary["values"]) == repeats
    assert summary["min"] <= summary["median"] <= summary["max"]
    assert summary["min"] > 0 and summary["unit"]


def test_reward_section_reports_every_figure_and_compares_scores():
    report = BenchReport()
    bench_reward(report, ANSWERS, repeats=2, shapes={"small": (6, 5)})
    for name in ("rouge_score", "pmc_cold", "pmc_steady", "pmc_repeat", "speedup_cold", "speedup_steady",
                 "speedup_repeat"):
        _assert_summarised(report, f"reward.small.{name}", 2)
    check = report.checks["reward.small.identical_scores"]
    assert check["identical"] is True
    assert check["pairs_compared"] == 2 * 2 * 6 * 5  # cold and steady scores, each repeat
    assert check["nonzero_scores"] > 0  # the workload is not all-zero pairs, which would match trivially


def test_identity_check_fails_when_scores_differ():
    load = make_workload(ANSWERS, 4, 3, seed=1)
    theirs = rouge_score_recall(load.references, load.candidates)
    ours = rouge_l_recall(load.references, load.candidates)
    assert compare_scores(ours, theirs)["identical"] is True
    nudged = ours.copy()
    nudged[np.argmax(ours)] += 1e-15
    result = compare_scores(nudged, theirs)
    assert result["identical"] is False and result["max_abs_diff"] > 0


def test_workload_has_one_reference_per_sample_and_fresh_texts():
    load = make_workload(ANSWERS, questions=8, n=5, seed=0)
    assert len(load.references) == len(load.candidates) == 40
    assert load.references[:5] == [ANSWERS[0]] * 5 and load.references[5] == ANSWERS[1]
    assert len(set(load.candidates)) > 30  # samples are new texts, so the text cache is really cold


def test_report_json_and_table_hold_every_figure(tmp_path):
    report = BenchReport()
    report.add("a.rate", "tokens/s", [3.0, 1.0, 2.0])
    report.add("b.rate", "tokens/s", [1.0, 1.0, 4.0])
    report.add_ratio("a_over_b", "a.rate", "b.rate")
    data = report.as_dict()
    assert data["figures"]["a.rate"] | {"values": None} == {"unit": "tokens/s", "min": 1.0, "median": 2.0,
                                                           "max": 3.0, "values": None, "note": ""}
    assert data["figures"]["a_over_b"]["values"] == [3.0, 1.0, 0.5]
    table = markdown_table(report)
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["a.rate", "b.rate", "a_over_b"]
    json.dumps(data)  # bench.json is plain JSON


@pytest.mark.parametrize("override, key", [("sections=[reward,nope]", "sections"), ("batch_sizes=[0]", "batch_sizes"),
                                           ("repeats=0", "repeats"), ("bogus=1", "bogus"),
                                           ("epoch_questions=[0]", "epoch_questions"),
                                           ("epoch_questions=[18,500]", "epoch_questions")])
def test_bench_rejects_bad_settings_in_one_line(override, key, capsys, tmp_path):
    assert main(["bench", override, f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pmc bench: error:") and key in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_hf_sample_cuts_each_sample_at_eos(tiny_model_dir):
    import torch

    from pmc_pipeline.bench.hf_generate import hf_sample, load_hf_model

    threads = torch.get_num_threads()
    model = load_hf_model(str(tiny_model_dir), threads=1)
    torch.set_num_threads(threads)
    eos = model.config.eos_token_id
    samples = hf_sample(model, [[5, 6, 7], [8, 9]], n=3, temperature=1.0, top_p=0.95, max_tokens=6,
                        pad_id=model.config.pad_token_id, eos_id=eos, seed=0)
    assert [len(row) for row in samples] == [3, 3]
    for row in samples:
        for tokens in row:
            assert 1 <= len(tokens) <= 6
            assert eos not in tokens[:-1]  # nothing after EOS is counted


@pytest.mark.engines
def test_rollout_section_against_the_session_engine(rollout_actor, tiny_model_dir):
    import torch

    from pmc_pipeline.bench.hf_generate import load_hf_model
    from pmc_pipeline.bench.rollout_section import bench_rollout
    from rollout.client import RolloutClient

    threads = torch.get_num_threads()
    model = load_hf_model(str(tiny_model_dir), threads=1)
    torch.set_num_threads(threads)
    report = BenchReport()
    bench_rollout(report, RolloutClient(rollout_actor), model, [[5, 6, 7], [8, 9, 10, 11]], batch_sizes=[1, 3],
                  n=2, temperature=1.0, top_p=0.95, max_tokens=6, pad_id=model.config.pad_token_id,
                  eos_id=model.config.eos_token_id, repeats=2)
    for size in (1, 3):
        for name in ("vllm", "hf_generate", "speedup"):
            _assert_summarised(report, f"rollout.{name}.b{size}", 2)


@pytest.mark.engines
def test_epoch_section_runs_the_three_schedules_from_one_start_at_each_question_count(
        tmp_path, lent, tiny_model_dir, demo_data_dir, finetuned_demo_model):
    from pmc_pipeline.bench.pipeline_section import SCHEDULES, EpochSetup, bench_epochs
    from pmc_pipeline.config import from_mapping
    from pmc_pipeline.data.qa import read_rows
    from pmc_pipeline.recipes.roles import trainer_job
    from pmc_pipeline.recipes.unlearn import check_unlearn
    from pmc_pipeline.runtime.session import PipelineSession

    cfg = from_mapping("unlearn", {
        "seed": 0, "model": {"path": str(finetuned_demo_model)}, "run_dir": str(tmp_path / "unused"),
        "data": {"tofu_dir": str(demo_data_dir), "retain": "retain", "forget": "forget"},
        "trainer": {"batch_size": 2, "max_length": 128, "torch_threads": 1},
        "sampling": {"num_samples": 2, "max_tokens": 8}, "pmc": {"reference_max_tokens": 8},
        "rollout": {"max_model_len": 512}})
    inputs = check_unlearn(cfg)
    retain = [inputs.formatter.example(p.question, p.answer, "retain", 128) for p in inputs.retain_pairs]
    session = PipelineSession(**lent)
    rollout = session.rollout(inputs.model_source, cfg.rollout, cfg.model.dtype, cfg.seed)
    trainer = session.trainer(cfg.trainer, trainer_job(cfg, inputs.model_source, 4, None))
    try:
        session.connect_weight_push(trainer, rollout, cfg.rollout)
        pool = inputs.forget_questions + [row["question"] for row in read_rows(demo_data_dir / "retain.json")]
        report = BenchReport()
        setup = EpochSetup(cfg, rollout, trainer, inputs.formatter, retain, inputs.model_source, 1, tmp_path / "state")
        bench_epochs(report, setup, pool, [4, 6], repeats=2, out=tmp_path)
    finally:
        trainer.shutdown()
        rollout.load_checkpoint(str(tiny_model_dir))  # the shared engine gets its weights back
    for count in (4, 6):
        for schedule in SCHEDULES:
            _assert_summarised(report, f"epoch.q{count}.{schedule}.seconds", 2)
            assert set(report.profile[f"epoch_q{count}_{schedule}"]["phases"]) >= {"rollout", "reward", "train"}
        _assert_summarised(report, f"epoch.q{count}.speedup", 2)
        _assert_summarised(report, f"epoch.q{count}.overlap_gain", 2)
    assert [row["questions"] for row in report.profile["epoch_scaling"]] == [4, 6]
    for name in ("epoch_scaling.png", "timeline.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_reference_style_epoch_samples_scores_and_trains(tiny_model_dir):
    import torch

    from pmc_pipeline.bench.reference_epoch import ReferenceStyleEpochs
    from pmc_pipeline.data.prompts import PromptFormatter
    from pmc_pipeline.config import from_mapping
    from pmc_pipeline.models.source import load_tokenizer

    threads = torch.get_num_threads()
    formatter = PromptFormatter(load_tokenizer(str(tiny_model_dir)), "plain")
    cfg = from_mapping("unlearn", {"model": {"path": str(tiny_model_dir)}, "run_dir": "unused",
                                   "sampling": {"num_samples": 3, "max_tokens": 8},
                                   "trainer": {"batch_size": 2, "max_length": 64, "learning_rate": 1e-2,
                                               "weight_decay": 0.0}})
    questions = ["Where was the author born?", "What did she write?", "Which award did he win?"]
    retain = [formatter.example("Who wrote it?", "Someone else.", "retain", 64)]
    epochs = ReferenceStyleEpochs(str(tiny_model_dir), cfg, formatter, questions, ["Kuwait City 1932"] * 3,
                                  retain, threads=1)
    torch.set_num_threads(threads)
    before = [p.detach().clone() for p in epochs.model.parameters()]
    result = epochs.run_epoch(1)
    assert result["steps"] == 2  # 3 questions in batches of 2
    assert result["generated_tokens"] > 0 and set(result["seconds"]) == {"rollout", "reward", "train"}
    assert any(not torch.equal(a, b) for a, b in zip(before, epochs.model.parameters()))
