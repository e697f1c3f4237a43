"""`pmc finetune`: check every input first, then SFT with the ZeRO-3 trainer on a pipeline session.

Nothing is written before all inputs (config, model, data) are checked; the checkpoint is built
under a temporary name and renamed into a new output_dir."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmc_pipeline import config as config_module
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.data.qa import QAPair, check_prompt_lengths, load_qa_set, trainer_limit
from pmc_pipeline.models.source import load_tokenizer, resolve_model_source, validate_model_folder
from pmc_pipeline.recipes.roles import failures_named, job_roles, trainer_job
from pmc_pipeline.runtime.atomic import require_new_dir
from pmc_pipeline.runtime.session import PipelineSession
from pmc_pipeline.schema import FinetuneConfig
from pmc_pipeline.tracking import open_trackers

log = logging.getLogger(__name__)


@dataclass
class FinetuneInputs:
    model_source: str
    formatter: PromptFormatter
    pairs: list[QAPair]


def check_finetune(cfg: FinetuneConfig) -> FinetuneInputs:
    source = resolve_model_source(cfg.model.path, cfg.model.gguf_file)
    if not cfg.model.gguf_file:  # a GGUF file carries its own config and weights
        validate_model_folder(source, vllm=False)  # only the trainer loads it here
    tokenizer = load_tokenizer(source, cfg.model.gguf_file)
    formatter = PromptFormatter.for_model(tokenizer, cfg.model)
    train = load_qa_set(cfg.data.train, cfg.data, "data.train")
    check_prompt_lengths(train, formatter, trainer_limit(cfg.trainer.max_length))
    return FinetuneInputs(source, formatter, train.pairs)


def run_finetune(cfg: FinetuneConfig, session: PipelineSession | None = None) -> Path:
    """SFT on question/answer pairs with the ZeRO-3 trainer; writes an HF checkpoint to output_dir."""
    inputs = check_finetune(cfg)
    out_dir = require_new_dir(cfg.output_dir, "output_dir")
    examples = [inputs.formatter.example(p.question, p.answer, "sft", cfg.trainer.max_length) for p in inputs.pairs]
    world, batch = cfg.trainer.world_size, cfg.trainer.batch_size
    steps_per_epoch = math.ceil(len(examples) / (batch * world))
    # every epoch ends on an optimizer step (trainer/zero3.py train_steps): ceil per epoch
    total_steps = max(1, cfg.epochs * math.ceil(steps_per_epoch / cfg.trainer.grad_accum))
    job = trainer_job(cfg, inputs.model_source, batch, total_steps)
    stage = "start-up"
    with open_trackers(cfg.report_to, cfg.tracking, f"finetune-{out_dir.name}", config_module.to_dict(cfg)) as trackers, \
            job_roles(cfg, session) as roles, failures_named(lambda: f"fine-tuning {stage}"):
        trainer = roles.trainer = roles.session.trainer(cfg.trainer, job)
        rng = np.random.default_rng(cfg.seed)
        for epoch in range(1, cfg.epochs + 1):
            stage, start = f"epoch {epoch}", time.perf_counter()
            order = rng.permutation(len(examples))
            batches = [[examples[i] for i in order[s:s + batch * world]]
                       for s in range(0, len(order), batch * world)]
            metrics = trainer.train_batches(batches, {"sft": 1.0})
            seconds = time.perf_counter() - start
            trackers.log({"loss": metrics["loss"], "lr": metrics["lr"], "seconds": seconds}, epoch)
            log.info("finetune epoch %d/%d: loss %.4f (%.1f s)", epoch, cfg.epochs, metrics["loss"], seconds)
        stage = "save"
        trainer.save_pretrained(str(out_dir))
        trackers.summary({"checkpoint": str(out_dir.resolve()), "epochs": cfg.epochs})
    log.info("fine-tuned checkpoint written to %s", out_dir)
    return out_dir
