"""`pmc unlearn`: check every input first, then PMC-unlearning on a pipeline session.

    check_unlearn   config, model, data, placement, resume point: before anything starts
    run_unlearning  claim the run dir; start trainer ranks and engines side by side; references
                    (or a checkpoint's state); the loop with metrics, evaluation and checkpoints
                    every epoch; the final checkpoint; summary.json last"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmc_pipeline import config as config_module
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.data.qa import QAPair, check_prompt_lengths, engine_limit, load_forget_set, load_qa_set, trainer_limit
from pmc_pipeline.errors import Interrupted, PMCError
from pmc_pipeline.eval.model_card import SUMMARY as CARD_SUMMARY, card_text, unlearning_summary, write_model_card
from pmc_pipeline.method.alignment import refusals_for
from pmc_pipeline.method.epoch_record import EpochRecord
from pmc_pipeline.method.loop import PMCLoop, reference_answers
from pmc_pipeline.method.rewards import resolve_reward
from pmc_pipeline.models.source import (check_context_length, load_tokenizer, model_position_limit,
                                       resolve_model_source, validate_model_folder)
from pmc_pipeline.recipes.roles import failures_named, job_roles, trainer_job
from pmc_pipeline.runtime.atomic import append_jsonl, atomic_write_json, atomic_write_text, new_workspace
from pmc_pipeline.runtime.checkpoints import (checkpoint_dir, complete_checkpoints, load_loop_state,
                                              save_epoch_checkpoint)
from pmc_pipeline.runtime.progress import duration
from pmc_pipeline.runtime.session import PipelineSession
from pmc_pipeline.schema import UnlearnConfig
from pmc_pipeline.tracking import Trackers, open_trackers

log = logging.getLogger(__name__)


@dataclass
class UnlearnInputs:
    model_source: str
    formatter: PromptFormatter
    forget_questions: list[str]
    retain_pairs: list[QAPair]
    refusals: list[str]  # pmc.refusals_file's lines when a variant uses them (read once, up front)
    eval_data: Any = None  # evaluation splits when evaluation.eval_every > 0 (pmc_pipeline/data/eval_splits.py)
    resume_epoch: int = 0  # > 0: continue after this epoch's checkpoint


def check_unlearn(cfg: UnlearnConfig) -> UnlearnInputs:
    if cfg.model.gguf_file:
        raise PMCError("model.gguf_file: the vLLM rollout needs a Hugging Face folder; fine-tune or convert the "
                       "GGUF model first (`pmc finetune` writes one)")
    source = resolve_model_source(cfg.model.path)
    validate_model_folder(source, model_impl=cfg.rollout.model_impl)  # vLLM samples from it, the trainer trains it
    check_context_length(cfg.rollout.max_model_len, model_position_limit(source))
    tokenizer = load_tokenizer(source)
    formatter = PromptFormatter.for_model(tokenizer, cfg.model)
    forget = load_forget_set(cfg.data.forget, cfg.data)
    retain = load_qa_set(cfg.data.retain, cfg.data, "data.retain")
    # forget prompts are sampled (and greedily answered for the references), then trained on
    engine = engine_limit(cfg.rollout.max_model_len, {"sampling.max_tokens": cfg.sampling.max_tokens,
                                                       "pmc.reference_max_tokens": cfg.pmc.reference_max_tokens})
    train_limit = trainer_limit(cfg.trainer.max_length)
    check_prompt_lengths(forget, formatter, engine, train_limit)
    check_prompt_lengths(retain, formatter, train_limit)
    resolve_reward(cfg.pmc.reward)  # a user reward and the refusal file load now, before any engine starts
    refusals = refusals_for(cfg.pmc)
    if cfg.trainer.warmup_ratio:
        raise PMCError(f"trainer.warmup_ratio={cfg.trainer.warmup_ratio}: PMC-unlearning trains at a constant "
                       "learning rate (an epoch's steps depend on its samples); warm-up applies to `pmc finetune`")
    from pmc_pipeline.runtime.placement import plan_from_config

    on_gpus = config_module.use_gpus(cfg)
    plan = plan_from_config(cfg, on_gpus)  # an impossible placement fails before anything is written
    if cfg.pmc.overlap and plan.colocate and on_gpus:
        raise PMCError("pmc.overlap=true with resources.colocate=true: colocated engines sleep (free the GPU) while "
                       "the trainer trains, so they cannot sample the next chunk meanwhile; set pmc.overlap=false")
    resume_epoch = resumable_epoch(cfg) if cfg.resume else 0
    run_dir = Path(cfg.run_dir)
    if not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise PMCError(f"run_dir {run_dir} already exists and is not empty; choose a new run_dir, or continue "
                       f"it with resume={run_dir} (earlier results are never overwritten)")
    eval_data = None
    if cfg.evaluation.eval_every:
        from pmc_pipeline.data.eval_splits import check_eval_prompts, load_eval_data

        eval_data = load_eval_data(cfg.evaluation, cfg.data, cfg.evaluation.forget or cfg.data.forget)
        check_eval_prompts(eval_data, formatter,
                           engine_limit(cfg.rollout.max_model_len, {"evaluation.max_tokens": cfg.evaluation.max_tokens}))
    return UnlearnInputs(source, formatter, forget.questions, retain.pairs, refusals, eval_data=eval_data,
                         resume_epoch=resume_epoch)


# settings a resumed run may change; any other difference from the run's config.yaml is an error
RESUMABLE_CHANGES = ("resume", "run_dir", "pmc.epochs", "resources", "evaluation", "log_samples",
                     "checkpoint_every", "keep_checkpoints", "report_to", "tracking")


def resumable_epoch(cfg: UnlearnConfig) -> int:
    """The last complete checkpoint's epoch of the run `resume=` names (which becomes run_dir)."""
    run_dir = Path(cfg.resume)
    saved_config = run_dir / "config.yaml"
    if not saved_config.is_file():
        raise PMCError(f"resume={run_dir}: not a pmc run directory (no config.yaml)")
    cfg.run_dir = str(run_dir)
    changed = config_changes(run_dir, cfg)
    if changed:
        raise PMCError(f"resume={run_dir}: the config differs from the run's config.yaml in {', '.join(changed)}")
    epochs = complete_checkpoints(run_dir)
    if not epochs:
        raise PMCError(f"resume={run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    if epochs[-1] >= cfg.pmc.epochs:
        raise PMCError(f"resume={run_dir}: the run already reached epoch {epochs[-1]} of pmc.epochs={cfg.pmc.epochs}")
    return epochs[-1]


def prepare_run_dir(run_dir: Path, cfg: UnlearnConfig) -> str:
    """What running `cfg` into run_dir again means (a sweep trial, a benchmark stage): "complete" (nothing
    to do), "resume" (from its last checkpoint) or "new"; a run stopped before its first checkpoint is
    moved aside to `<run_dir>.interrupted-<time>`, never deleted."""
    if not (run_dir / "config.yaml").is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise PMCError(f"{run_dir} exists but is not a pmc run dir; move it away")
        return "new"
    changed = config_changes(run_dir, cfg)
    if changed:
        raise PMCError(f"{run_dir} holds a run with other settings ({', '.join(changed)}); use a new folder")
    if run_is_complete(run_dir, cfg):
        return "complete"
    if complete_checkpoints(run_dir):
        return "resume"
    aside = run_dir.with_name(f"{run_dir.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    log.warning("%s had no checkpoint to resume from; moved to %s to start again", run_dir, aside)
    return "new"


def run_is_complete(run_dir: Path, cfg: UnlearnConfig) -> bool:
    """Whether run_dir holds a finished run of cfg's epoch count (its summary is written last)."""
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("epochs") == cfg.pmc.epochs


def config_changes(run_dir: Path, cfg: UnlearnConfig) -> list[str]:
    """The keys (other than RESUMABLE_CHANGES) in which cfg differs from the config.yaml of run_dir. A key
    the saved config lacks (a setting added since the run) counts as its default."""
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    current = config_module.to_dict(cfg)
    defaults = OmegaConf.to_container(OmegaConf.structured(UnlearnConfig), resolve=True)
    saved_keys = _flat_keys(saved)

    def before(key: str) -> Any:
        return _lookup(saved, key) if key in saved_keys else _lookup(defaults, key)

    return sorted(key for key in saved_keys | _flat_keys(current)
                  if not key.startswith(RESUMABLE_CHANGES) and before(key) != _lookup(current, key))


def _flat_keys(tree: Any, prefix: str = "") -> set[str]:
    """Dotted names of the leaves ("rollout.model_impl")."""
    if not isinstance(tree, dict) or not tree:
        return {prefix}
    return set().union(*(_flat_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in tree.items()))


def _lookup(tree: Any, dotted: str) -> Any:
    for part in [p for p in dotted.split(".") if p]:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


@dataclass
class UnlearnResult:
    run_dir: Path
    history: list[EpochRecord]
    checkpoint: Path
    references: list[str]


def run_unlearning(cfg: UnlearnConfig, session: PipelineSession | None = None,
                   inputs: UnlearnInputs | None = None) -> UnlearnResult:
    """PMC-unlearning of cfg.model.path; writes metrics.jsonl and an HF checkpoint under cfg.run_dir.

    A new run dir is removed again if the run fails before its first epoch is done; a failure or an
    interrupt later leaves it resumable from its last complete checkpoint, and the error says how."""
    inputs = inputs or check_unlearn(cfg)
    run_dir = Path(cfg.run_dir)
    workspace = (contextlib.nullcontext(run_dir) if inputs.resume_epoch else
                 new_workspace(run_dir, "run_dir", worth_keeping=lambda d: _metric_lines(d) > 0))
    run_name = f"unlearn-{run_dir.name}" + (f"-from-epoch-{inputs.resume_epoch}" if inputs.resume_epoch else "")
    with open_trackers(cfg.report_to, cfg.tracking, run_name, config_module.to_dict(cfg)) as trackers:
        try:
            with workspace:
                return _unlearn(cfg, session, inputs, run_dir, trackers)
        except Interrupted as exc:
            raise exc.where(_resume_hint(run_dir)) from None
        except PMCError as exc:
            raise PMCError(f"{exc}{_resume_hint(run_dir)}") from exc


def _metric_lines(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _resume_hint(run_dir: Path) -> str:
    """What a stopped run left: a checkpoint to resume from, or nothing."""
    epochs = complete_checkpoints(run_dir)
    if epochs:
        return f"; continue from epoch {epochs[-1]}'s checkpoint with resume={run_dir}"
    if run_dir.is_dir():
        return f"; {run_dir} holds no complete checkpoint to resume from"
    return "; nothing was kept (no epoch had finished)"


def _unlearn(cfg: UnlearnConfig, session: PipelineSession | None, inputs: UnlearnInputs, run_dir: Path,
             trackers: Trackers) -> UnlearnResult:
    metrics_path = run_dir / "metrics.jsonl"
    elapsed_before = 0.0  # unlearning seconds already spent (a resumed run's time curves continue)
    if inputs.resume_epoch:
        # epochs after the checkpoint will be run again: their metric lines go
        kept = metrics_path.read_text().splitlines(keepends=True)[:inputs.resume_epoch]
        atomic_write_text(metrics_path, "".join(kept))
        elapsed_before = float(json.loads(kept[-1]).get("elapsed_seconds", 0.0)) if kept else 0.0
        log.info("resuming %s after epoch %d", run_dir, inputs.resume_epoch)
    else:
        atomic_write_text(run_dir / "config.yaml", config_module.to_yaml(cfg))

    retain = [inputs.formatter.example(p.question, p.answer, "retain", cfg.trainer.max_length)
              for p in inputs.retain_pairs]
    # one micro-batch holds batch_size forget winners, as many retain (and PMC-alignment refusal) examples
    per_winner = 3 if cfg.pmc.lambda_align > 0 else 2
    job = trainer_job(cfg, inputs.model_source, per_winner * cfg.trainer.batch_size, None)  # constant lr
    completed: list[int] = []  # epochs done: a failure names the epoch it happened in
    trainer = None

    def stage() -> str:
        return f"epoch {inputs.resume_epoch + len(completed) + 1}" if trainer else "start-up"

    with job_roles(cfg, session) as roles:
        session = roles.session
        with failures_named(stage):
            # The trainer ranks start (model load, DeepSpeed init: the slowest setup step) in their own
            # processes while the engine loads the model and computes the references; nothing waits for both.
            with ThreadPoolExecutor(max_workers=1) as pool:
                starting = pool.submit(session.trainer, cfg.trainer, job)
                try:
                    rollout = session.rollout(inputs.model_source, cfg.rollout, cfg.model.dtype, cfg.seed)
                    references = [] if inputs.resume_epoch else reference_answers(
                        rollout, inputs.formatter, inputs.forget_questions, cfg.pmc.reference_max_tokens)
                except BaseException:
                    with contextlib.suppress(Exception):
                        starting.result().shutdown(kill=True)
                    raise
                trainer = roles.trainer = starting.result()
            session.connect_weight_push(trainer, rollout, cfg.rollout)
            loop = PMCLoop(cfg, rollout, trainer, inputs.formatter, inputs.forget_questions, retain, references,
                           inputs.refusals)
            atomic_write_json(run_dir / "roles.json", {  # what each role runs with, read back from it
                "trainer_ranks": trainer.effective_settings(), "rollout_engines": rollout.effective_settings()})
            if inputs.resume_epoch:
                loop.load_state_dict(load_loop_state(run_dir, inputs.resume_epoch))
                trainer.load_state(str(checkpoint_dir(run_dir, inputs.resume_epoch) / "trainer"))
                trainer.push_weights()
            evaluator = None
            if inputs.eval_data is not None:  # greedy TOFU metrics on the live engine, epoch 0 first
                from pmc_pipeline.eval.metrics import PeriodicEvaluator

                evaluator = PeriodicEvaluator(rollout, inputs.formatter, inputs.eval_data, cfg.evaluation.max_tokens,
                                              cfg.evaluation.eval_every, cfg.pmc.epochs, elapsed_before)
                if not inputs.resume_epoch:
                    atomic_write_json(run_dir / "eval_before.json", evaluator.scores())

            def on_epoch(record: EpochRecord) -> None:
                if evaluator is not None:
                    record.extra.update(evaluator.after_epoch(record.epoch))
                append_jsonl(metrics_path, record.as_dict())
                trackers.log(record.as_dict(), record.epoch)
                every = cfg.checkpoint_every
                if every and (record.epoch % every == 0 or record.epoch == cfg.pmc.epochs):
                    save_epoch_checkpoint(run_dir, record.epoch, trainer, loop.state_dict(), cfg.keep_checkpoints)
                completed.append(record.epoch)
                spent = time.monotonic() - loop_started  # this session's epochs, evaluation and checkpoints
                left = spent / len(completed) * (cfg.pmc.epochs - record.epoch)
                log.info("epoch %d/%d: reward %.3f (max %.3f), loss forget %s retain %s, %d prompts, "
                         "%.1f s: %.1f s rollout / %.1f s train / %.1f s push; about %s left", record.epoch,
                         cfg.pmc.epochs, record.reward_mean, record.reward_max, _fmt(record.loss_forget),
                         _fmt(record.loss_retain), record.prompts_sampled, record.seconds["epoch"],
                         record.seconds["rollout"], record.seconds["train"], record.seconds["weight_push"],
                         duration(left))

            loop_started = time.monotonic()
            history = loop.run(on_epoch, start_epoch=inputs.resume_epoch + 1)
            checkpoint = run_dir / "checkpoint-final"
            trainer.save_pretrained(str(checkpoint))
            summary = unlearning_summary(cfg, len(inputs.forget_questions), len(inputs.retain_pairs))
            atomic_write_json(checkpoint / CARD_SUMMARY, {"base_model": cfg.model.path, **summary})
            write_model_card(checkpoint, card_text(run_dir.name, cfg.model.path, summary))
        if cfg.log_samples:
            atomic_write_json(run_dir / "references.json", [{"question": q, "reference": r} for q, r in
                                                            zip(inputs.forget_questions, loop.references)])
        trackers.summary({"checkpoint": str(checkpoint.resolve()), "run_dir": str(run_dir.resolve()),
                          "epochs": cfg.pmc.epochs})
        atomic_write_json(run_dir / "summary.json", {  # written last: the one file that says the run is complete
            "status": "complete", "epochs": cfg.pmc.epochs, "resumed_after_epoch": inputs.resume_epoch or None,
            "checkpoint": checkpoint.name,
            "final": history[-1].as_dict() if history else None,
        })
        return UnlearnResult(run_dir, history, checkpoint, loop.references)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
