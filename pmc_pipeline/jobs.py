"""`pmc finetune` and `pmc unlearn`: check every input first, then run on a pipeline session.

Nothing is written before all inputs (config, model, data) are checked, so bad input leaves no
half-made run directory. Outputs are written atomically (temp path, then rename).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pmc_pipeline import config as config_module
from pmc_pipeline.atomic import append_jsonl, atomic_write_json, atomic_write_text
from pmc_pipeline.data import QAPair, load_forget_questions, load_qa_pairs
from pmc_pipeline.errors import PMCError
from pmc_pipeline.loop import EpochRecord, PMCLoop, PMCSettings
from pmc_pipeline.models import load_tokenizer, resolve_model_source
from pmc_pipeline.prompts import PromptFormatter
from pmc_pipeline.session import PipelineSession

log = logging.getLogger(__name__)


def trainer_settings(cfg: DictConfig, model_source: str, micro_batch_size: int, total_steps: int | None):
    from trainer.zero3 import TrainerSettings

    t = cfg.trainer
    use_gpus = config_module.use_gpus(cfg)
    backend = t.backend if t.backend != "auto" else ("nccl" if use_gpus else "gloo")
    warmup = int(round(t.warmup_ratio * total_steps)) if total_steps else 0
    return TrainerSettings(
        model_path=model_source, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, micro_batch_size=micro_batch_size,
        grad_accum=t.grad_accum, warmup_steps=warmup, total_steps=total_steps,
        gradient_checkpointing=t.gradient_checkpointing, label_smoothing=t.label_smoothing,
        seed=cfg.seed, backend=backend, torch_threads=t.torch_threads,
    )


def rollout_settings(cfg: DictConfig, model_source: str):
    from rollout.worker import RolloutSettings

    r = cfg.rollout
    return RolloutSettings(
        model_path=model_source, dtype=cfg.model.dtype, max_model_len=r.max_model_len,
        tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
        cpu_kv_cache_gib=r.cpu_kv_cache_gib, enforce_eager=r.enforce_eager,
        enable_prefix_caching=r.enable_prefix_caching, seed=cfg.seed,
    )


def open_session(cfg: DictConfig) -> PipelineSession:
    res = cfg.resources
    return PipelineSession(res.ray_address, res.num_cpus, use_gpus=config_module.use_gpus(cfg))


# -- fine-tuning ------------------------------------------------------------------------------------

@dataclass
class FinetuneInputs:
    model_source: str
    formatter: PromptFormatter
    pairs: list[QAPair]


def check_finetune(cfg: DictConfig) -> FinetuneInputs:
    source = resolve_model_source(cfg.model.path, cfg.model.gguf_file)
    tokenizer = load_tokenizer(source, cfg.model.gguf_file)
    formatter = PromptFormatter(tokenizer, cfg.model.prompt_format, cfg.model.system_prompt)
    pairs = load_qa_pairs(cfg.data.train, cfg.data)
    return FinetuneInputs(source, formatter, pairs)


def run_finetune(cfg: DictConfig, session: PipelineSession | None = None) -> Path:
    """SFT on question/answer pairs with the ZeRO-3 trainer; writes an HF checkpoint to output_dir."""
    inputs = check_finetune(cfg)
    out_dir = Path(cfg.output_dir)
    examples = [inputs.formatter.example(p.question, p.answer, "sft", cfg.trainer.max_length) for p in inputs.pairs]
    world, batch = cfg.trainer.world_size, cfg.trainer.batch_size
    steps_per_epoch = math.ceil(len(examples) / (batch * world))
    total_steps = max(1, cfg.epochs * steps_per_epoch // cfg.trainer.grad_accum)
    settings = trainer_settings(cfg, inputs.model_source, batch, total_steps)
    owns_session = session is None
    session = session or open_session(cfg)
    trainer = session.trainer(settings, world)
    try:
        rng = np.random.default_rng(cfg.seed)
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            order = rng.permutation(len(examples))
            batches = [[examples[i] for i in order[s:s + batch * world]] for s in range(0, len(order), batch * world)]
            metrics = trainer.train_epoch(batches, {"sft": 1.0})
            log.info("finetune epoch %d/%d: loss %.4f (%.1f s)", epoch, cfg.epochs, metrics["loss"],
                     time.perf_counter() - start)
        trainer.save_pretrained(str(out_dir))
    finally:
        trainer.shutdown()
        if owns_session:
            session.close()
    log.info("fine-tuned checkpoint written to %s", out_dir)
    return out_dir


# -- unlearning -------------------------------------------------------------------------------------

@dataclass
class UnlearnInputs:
    model_source: str
    formatter: PromptFormatter
    forget_questions: list[str]
    retain_pairs: list[QAPair]


def check_unlearn(cfg: DictConfig) -> UnlearnInputs:
    if cfg.model.gguf_file:
        raise PMCError("model.gguf_file: the vLLM rollout needs a Hugging Face folder; fine-tune or convert the "
                       "GGUF model first (`pmc finetune` writes one)")
    source = resolve_model_source(cfg.model.path)
    tokenizer = load_tokenizer(source)
    formatter = PromptFormatter(tokenizer, cfg.model.prompt_format, cfg.model.system_prompt)
    questions = load_forget_questions(cfg.data.forget, cfg.data)
    retain = load_qa_pairs(cfg.data.retain, cfg.data)
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise PMCError(f"run_dir {run_dir} already exists and is not empty; choose a new run_dir "
                       "(earlier results are never overwritten)")
    return UnlearnInputs(source, formatter, questions, retain)


@dataclass
class UnlearnResult:
    run_dir: Path
    history: list[EpochRecord]
    checkpoint: Path
    references: list[str]


def pmc_settings(cfg: DictConfig) -> PMCSettings:
    s, p = cfg.sampling, cfg.pmc
    return PMCSettings(
        epochs=p.epochs, num_samples=s.num_samples, temperature=s.temperature, top_p=s.top_p,
        max_tokens=s.max_tokens, lambda_retain=p.lambda_retain, min_len=p.min_len,
        batch_size=cfg.trainer.batch_size, max_length=cfg.trainer.max_length,
        reference_max_tokens=p.reference_max_tokens, seed=cfg.seed,
    )


def run_unlearning(cfg: DictConfig, session: PipelineSession | None = None,
                   inputs: UnlearnInputs | None = None) -> UnlearnResult:
    """PMC-unlearning of cfg.model.path; writes metrics.jsonl and an HF checkpoint under cfg.run_dir."""
    inputs = inputs or check_unlearn(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_module.to_yaml(cfg))
    metrics_path = run_dir / "metrics.jsonl"

    retain = [inputs.formatter.example(p.question, p.answer, "retain", cfg.trainer.max_length)
              for p in inputs.retain_pairs]
    # one micro-batch holds batch_size forget winners and as many retain examples
    settings = trainer_settings(cfg, inputs.model_source, 2 * cfg.trainer.batch_size, None)
    owns_session = session is None
    session = session or open_session(cfg)
    trainer = None
    try:
        rollout = session.rollout(inputs.model_source, rollout_settings(cfg, inputs.model_source))
        trainer = session.trainer(settings, cfg.trainer.world_size)
        loop = PMCLoop(pmc_settings(cfg), rollout, trainer, inputs.formatter, inputs.forget_questions, retain)
        loop.compute_references()

        def on_epoch(record: EpochRecord) -> None:
            append_jsonl(metrics_path, record.as_dict())
            log.info("epoch %d/%d: reward %.3f (max %.3f), loss forget %s retain %s, %d prompts, "
                     "%.1f s rollout / %.1f s train / %.1f s push", record.epoch, cfg.pmc.epochs,
                     record.reward_mean, record.reward_max, _fmt(record.loss_forget), _fmt(record.loss_retain),
                     record.prompts_sampled, record.seconds["rollout"], record.seconds["train"],
                     record.seconds["weight_push"])

        history = loop.run(on_epoch)
        checkpoint = run_dir / "checkpoint-final"
        trainer.save_pretrained(str(checkpoint))
        if cfg.log_samples:
            atomic_write_json(run_dir / "references.json",
                              [{"question": q, "reference": r} for q, r in zip(inputs.forget_questions, loop.references)])
        atomic_write_json(run_dir / "summary.json", {
            "status": "complete", "epochs": len(history), "checkpoint": checkpoint.name,
            "final": history[-1].as_dict() if history else None,
        })
        return UnlearnResult(run_dir, history, checkpoint, loop.references)
    finally:
        if trainer is not None:
            trainer.shutdown()
        if owns_session:
            session.close()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
