"""`pmc bench`: build the demo model, run every section on one Ray instance and one vLLM engine,
write bench.json and bench.md, print the table."""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pmc_pipeline import config as config_module
from pmc_pipeline.bench.figures import BenchReport, markdown_table, timed
from pmc_pipeline.bench.hf_generate import load_hf_model
from pmc_pipeline.bench.pipeline_section import (EpochSetup, add_push_share, bench_epochs, bench_trainer,
                                                 bench_weight_push)
from pmc_pipeline.bench.reward_section import bench_reward
from pmc_pipeline.bench.rollout_section import bench_rollout
from pmc_pipeline.data.demo_authors import generate_demo_data
from pmc_pipeline.data.qa import read_rows
from pmc_pipeline.errors import PMCError
from pmc_pipeline.recipes.demo import build_base_model, job_config, load_demo_config
from pmc_pipeline.recipes.finetune import run_finetune
from pmc_pipeline.recipes.roles import open_session, trainer_job
from pmc_pipeline.recipes.unlearn import UnlearnInputs, check_unlearn
from pmc_pipeline.runtime.atomic import atomic_write_json, atomic_write_text, new_workspace, require_new_dir
from pmc_pipeline.schema import BenchConfig, UnlearnConfig

log = logging.getLogger(__name__)

def output_dir(cfg: BenchConfig) -> Path:
    out = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.workdir) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    return require_new_dir(out, "out_dir")


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for package in ("vllm", "deepspeed", "ray", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # a missing optional part only leaves its version out
            info[package] = None
    return info


def epoch_question_pool(forget: list[dict], full: list[dict], counts: list[int]) -> list[str]:
    """The epoch section's questions: the forget set first, then the demo's other (also fine-tuned on)
    questions, enough for the largest of `counts`."""
    forget_questions = [row["question"] for row in forget]
    pool = forget_questions + [row["question"] for row in full if row["question"] not in set(forget_questions)]
    if max(counts) > len(pool):
        raise PMCError(f"epoch_questions={list(counts)}: the demo data has {len(pool)} questions; "
                       f"choose counts <= {len(pool)} (or more demo authors)")
    return pool


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Runs the selected sections; returns bench.json's content."""
    demo = load_demo_config(cfg.demo, [])
    out = output_dir(cfg)
    work = out / "work"
    started = time.perf_counter()
    report = BenchReport()
    report.settings = {"machine": machine(), "bench": config_module.to_dict(cfg)}
    setup: dict[str, float] = {}

    with new_workspace(out, "out_dir"):  # removed again if the bench fails
        data_dir = generate_demo_data(work / "data", demo.data.num_authors, demo.data.num_forget_authors,
                                      demo.data.seed)
        full = read_rows(data_dir / "full.json")
        question_pool = epoch_question_pool(read_rows(data_dir / "forget.json"), full, cfg.epoch_questions)
        if "reward" in cfg.sections:
            log.info("bench: reward section")
            bench_reward(report, [row["answer"] for row in full], cfg.repeats, cfg.seed)

        base_dir = work / "base-model"
        model_dir = work / "finetuned" if cfg.finetune_epochs > 0 else base_dir
        common = {"seed": demo.seed, "data": {"tofu_dir": str(data_dir), "train": "full", "forget": "forget",
                                              "retain": "retain"}}
        unlearn_partial = OmegaConf.to_container(OmegaConf.merge(demo.unlearn, cfg.unlearn))
        # the engine on as many CPU threads as HF generate and the reference-style epoch: like for like
        ul_cfg = job_config("unlearn", unlearn_partial, {**common, "model": {"path": str(model_dir)},
                                                         "run_dir": str(work / "unlearn"),
                                                         "rollout": {"cpu_threads": cfg.hf_threads}})
        report.settings["unlearn"] = config_module.to_dict(ul_cfg)
        report.settings["model"] = (f"demo '{cfg.demo}' model fine-tuned {cfg.finetune_epochs} epochs"
                                    if cfg.finetune_epochs > 0 else f"demo '{cfg.demo}' model, random init")

        engines_needed = {"rollout", "trainer", "epoch"} & set(cfg.sections)
        if engines_needed:
            setup["build_model"], _ = timed(lambda: build_base_model(demo, data_dir, base_dir))
            with open_session(ul_cfg) as session:
                # The engine boots (its own process) on the base model while the fine-tune runs.
                t0 = time.perf_counter()
                rollout = session.rollout(str(base_dir), ul_cfg.rollout, ul_cfg.model.dtype, ul_cfg.seed)
                if cfg.finetune_epochs > 0:
                    ft_cfg = job_config("finetune", demo.finetune, {**common, "model": {"path": str(base_dir)},
                                                                    "output_dir": str(model_dir),
                                                                    "epochs": cfg.finetune_epochs})
                    setup["finetune"], _ = timed(lambda: run_finetune(ft_cfg, session))
                inputs = check_unlearn(ul_cfg)
                rollout = session.rollout(inputs.model_source, ul_cfg.rollout, ul_cfg.model.dtype, ul_cfg.seed)
                rollout.stats()  # returns once the engine is up and holds the model
                setup["engine_ready_after_start"] = time.perf_counter() - t0
                _bench_with_engine(report, cfg, ul_cfg, session, rollout, inputs, question_pool, setup, out)
        report.profile["setup_seconds"] = setup
        report.profile["total_seconds"] = time.perf_counter() - started
        result = report.as_dict()
        table = markdown_table(report)
        atomic_write_json(out / "bench.json", result)
        atomic_write_text(out / "bench.md", f"# pmc bench\n\n{table}\n\n{_profile_text(report.profile)}\n")
    print(f"\n{table}\n\n{_profile_text(report.profile)}\n\nbench.json and bench.md in {out} "
          f"({report.profile['total_seconds']:.0f} s)")
    return result


def _bench_with_engine(report: BenchReport, cfg: BenchConfig, ul_cfg: UnlearnConfig, session: Any, rollout: Any,
                       inputs: UnlearnInputs, question_pool: list[str], setup: dict[str, float], out: Path) -> None:
    """The rollout, epoch and trainer sections, on the session's engine and one trainer group."""
    formatter = inputs.formatter
    s = ul_cfg.sampling
    model_dir = inputs.model_source
    if "rollout" in cfg.sections:
        log.info("bench: rollout section")
        prompts = [formatter.prompt_ids(q) for q in inputs.forget_questions]
        prompts += [formatter.prompt_ids(p.question) for p in inputs.retain_pairs]
        hf_model = load_hf_model(model_dir, cfg.hf_threads)
        pad = hf_model.config.pad_token_id if hf_model.config.pad_token_id is not None else 0
        bench_rollout(report, rollout, hf_model, prompts, list(cfg.batch_sizes), s.num_samples,
                      s.temperature, s.top_p, s.max_tokens, pad,
                      formatter.tokenizer.eos_token_id, cfg.repeats, cfg.seed)
        del hf_model
    if not {"trainer", "epoch"} & set(cfg.sections):
        return
    t = ul_cfg.trainer
    retain = [formatter.example(p.question, p.answer, "retain", t.max_length) for p in inputs.retain_pairs]
    setup["trainer_start"], trainer = timed(lambda: session.trainer(
        t, trainer_job(ul_cfg, model_dir, 2 * t.batch_size, None)))
    try:
        setup["weight_push_connect"], _ = timed(lambda: session.connect_weight_push(trainer, rollout, ul_cfg.rollout))
        if "epoch" in cfg.sections:
            log.info("bench: epoch section (overlapped, sequential, reference-style at %s questions)",
                     ", ".join(map(str, cfg.epoch_questions)))
            epoch_setup = EpochSetup(ul_cfg, rollout, trainer, formatter, retain, model_dir, cfg.hf_threads,
                                     out / "work" / "trainer-start")
            bench_epochs(report, epoch_setup, question_pool, cfg.epoch_questions, cfg.repeats, out)
        if "trainer" in cfg.sections:
            log.info("bench: trainer and weight-push section")
            global_batch = 2 * t.batch_size * t.world_size
            batches = [retain[i:i + global_batch] for i in range(0, len(retain), global_batch)]
            bench_trainer(report, trainer, batches, {"retain": 1.0}, cfg.repeats)
            bench_weight_push(report, trainer, cfg.repeats)
            add_push_share(report, cfg.epoch_questions[0])
    finally:
        trainer.shutdown()


def _profile_text(profile: dict[str, Any]) -> str:
    lines = []
    if profile.get("epoch_scaling"):
        lines += ["| forget questions | overlapped s | sequential s | reference-style s | speed-up vs reference | "
                  "overlap gain |", "|---|---|---|---|---|---|"]
        lines += [f"| {row['questions']} | {row['overlapped']:.2f} | {row['sequential']:.2f} | "
                  f"{row['reference_style']:.2f} | {row['reference_style'] / row['overlapped']:.2f}x | "
                  f"{row['sequential'] / row['overlapped']:.2f}x |" for row in profile["epoch_scaling"]]
        lines.append("")
    for name in sorted(k for k in profile if k.startswith("epoch_q")):
        phases = ", ".join(f"{k} {v['seconds']:.2f} s ({v['share']:.0%})" for k, v in profile[name]["phases"].items())
        lines.append(f"- {name.replace('_', ' ')} (median {profile[name]['median_epoch_seconds']:.2f} s): {phases}")
    if profile.get("setup_seconds"):
        lines.append("- setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in profile["setup_seconds"].items()))
    return "\n".join(lines)
