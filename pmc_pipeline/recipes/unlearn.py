"""`pmc unlearn`: check every input first, then unlearning by `method` (PMC, or one of the paper's
baselines) on a pipeline session.

    check_unlearn   config, model, data, placement, resume point: before anything starts
    run_unlearning  claim the run dir; start trainer ranks and engines side by side (a baseline starts an
                    engine only to evaluate); PMC's references (or a checkpoint's state); the loop
                    (method/loop.py or method/baseline_loop.py) with metrics, evaluation and checkpoints
                    every epoch; the final checkpoint and its model card; summary.json last"""

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
from pmc_pipeline.method.alignment import load_refusals, refusals_for
from pmc_pipeline.method.baseline_loop import BaselineLoop
from pmc_pipeline.method.baselines import REFUSALS, Baseline, resolve_baseline
from pmc_pipeline.method.loop import PMCLoop, reference_answers
from pmc_pipeline.method.rewards import resolve_reward
from pmc_pipeline.method.stopping import StoppingRule
from pmc_pipeline.models.source import (check_context_length, load_tokenizer, model_position_limit,
                                       resolve_model_source, validate_model_folder)
from pmc_pipeline.recipes.roles import failures_named, job_roles, trainer_job
from pmc_pipeline.runtime.atomic import append_jsonl, atomic_write_json, atomic_write_text, new_workspace
from pmc_pipeline.recipes.unlearn_run_dir import metric_lines, resumable_epoch, resume_hint
from pmc_pipeline.runtime.checkpoints import checkpoint_dir, load_loop_state, save_epoch_checkpoint
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
    refusals: list[str]  # pmc.refusals_file's (baseline.refusals_file's) lines when the method uses them
    eval_data: Any = None  # evaluation splits when evaluation.eval_every > 0 (pmc_pipeline/data/eval_splits.py)
    resume_epoch: int = 0  # > 0: continue after this epoch's checkpoint
    # the forget questions' ground-truth answers: read only for a baseline that trains on them, never for PMC
    forget_answers: list[str] | None = None
    keep_questions: list[str] | None = None  # data.keep's questions (PMC; their answers are never read)


def check_unlearn(cfg: UnlearnConfig) -> UnlearnInputs:
    if cfg.model.gguf_file:
        raise PMCError("model.gguf_file: the vLLM rollout needs a Hugging Face folder; fine-tune or convert the "
                       "GGUF model first (`pmc finetune` writes one)")
    source = resolve_model_source(cfg.model.path)
    validate_model_folder(source, model_impl=cfg.rollout.model_impl)  # vLLM samples from it, the trainer trains it
    check_context_length(cfg.rollout.max_model_len, model_position_limit(source))
    tokenizer = load_tokenizer(source)
    formatter = PromptFormatter.for_model(tokenizer, cfg.model)
    baseline = None if cfg.method == "pmc" else resolve_baseline(cfg.method)
    forget_answers = None
    if baseline is not None and baseline.trains_on_forget_answers:
        forget = _forget_with_answers(cfg)
        forget_answers = [pair.answer for pair in forget.pairs]
    else:
        forget = load_forget_set(cfg.data.forget, cfg.data)
    retain = load_qa_set(cfg.data.retain, cfg.data, "data.retain")
    train_limit = trainer_limit(cfg.trainer.max_length)
    if baseline is None:
        # forget prompts are sampled (and greedily answered for the references), then trained on
        engine = engine_limit(cfg.rollout.max_model_len, {"sampling.max_tokens": cfg.sampling.max_tokens,
                                                           "pmc.reference_max_tokens": cfg.pmc.reference_max_tokens})
        check_prompt_lengths(forget, formatter, engine, train_limit)
        resolve_reward(cfg.pmc.reward)  # a user reward and the refusal file load now, before any engine starts
        refusals = refusals_for(cfg.pmc)
    else:
        check_prompt_lengths(forget, formatter, train_limit)
        _check_baseline_settings(cfg, baseline)
        refusals = (load_refusals(cfg.baseline.refusals_file, "baseline.refusals_file")
                    if REFUSALS in baseline.reads else [])
    check_prompt_lengths(retain, formatter, train_limit)
    keep = None
    if cfg.data.keep:
        if baseline is not None:
            raise PMCError(f"data.keep={cfg.data.keep}: the keep set is PMC's; method={cfg.method} does not read it")
        keep = load_forget_set(cfg.data.keep, cfg.data, "data.keep")
        # greedily answered by the starting model once (the targets), then trained on
        check_prompt_lengths(keep, formatter, engine_limit(cfg.rollout.max_model_len, {
            "pmc.reference_max_tokens": cfg.pmc.reference_max_tokens}), train_limit)
    _check_stopping_rule(cfg, baseline)
    if cfg.trainer.warmup_ratio:
        raise PMCError(f"trainer.warmup_ratio={cfg.trainer.warmup_ratio}: unlearning trains at a constant learning "
                       "rate (a PMC epoch's steps depend on its samples); warm-up applies to `pmc finetune`")
    from pmc_pipeline.runtime.placement import plan_from_config

    on_gpus = config_module.use_gpus(cfg)
    # an impossible placement fails before anything is written; a baseline without evaluation places no engine
    plan = plan_from_config(cfg, on_gpus, with_rollout=cfg.needs_rollout)
    if baseline is None and cfg.pmc.overlap and plan.colocate and on_gpus:
        raise PMCError("pmc.overlap=true with resources.colocate=true: colocated engines sleep (free the GPU) while "
                       "the trainer trains, so they cannot sample the next chunk meanwhile; set pmc.overlap=false")
    resume_epoch = resumable_epoch(cfg) if cfg.resume else 0
    run_dir = Path(cfg.run_dir)
    if not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise PMCError(f"run_dir {run_dir} already exists and is not empty; choose a new run_dir, or continue "
                       f"it with resume={run_dir} (earlier results are never overwritten)")
    eval_data = None
    if cfg.evaluation.eval_every:
        from pmc_pipeline.data.eval_splits import check_eval_prompts, check_max_length, load_eval_data

        check_max_length(cfg.evaluation, cfg.rollout.max_model_len)
        eval_data = load_eval_data(cfg.evaluation, cfg.data, cfg.evaluation.forget or cfg.data.forget)
        check_eval_prompts(eval_data, formatter,
                           engine_limit(cfg.rollout.max_model_len, {"evaluation.max_tokens": cfg.evaluation.max_tokens}))
    return UnlearnInputs(source, formatter, forget.questions, retain.pairs, refusals, eval_data=eval_data,
                         resume_epoch=resume_epoch, forget_answers=forget_answers,
                         keep_questions=keep.questions if keep else None)


def _check_stopping_rule(cfg: UnlearnConfig, baseline: Baseline | None) -> None:
    if not StoppingRule.from_config(cfg.pmc).active:
        return
    setting = "pmc.stop_at_reference_recall" if cfg.pmc.stop_at_reference_recall is not None \
        else "pmc.stop_below_keep_recall"
    if baseline is not None:
        raise PMCError(f"{setting}: the stopping rule watches PMC's drift from its references; method={cfg.method} "
                       "has none (unset it, or compare the baseline's evaluated epochs instead)")
    if not cfg.evaluation.eval_every:
        raise PMCError(f"{setting}: the stopping rule is checked at evaluated epochs; set evaluation.eval_every > 0")
    if cfg.pmc.stop_below_keep_recall is not None and not cfg.data.keep:
        raise PMCError("pmc.stop_below_keep_recall: the keep answers' drift needs a keep set; set data.keep")
    if cfg.pmc.stop_at_reference_recall is not None and (cfg.pmc.restart_every or cfg.pmc.restart_on_plateau):
        raise PMCError("pmc.stop_at_reference_recall with restarts: a restart makes the current answers the new "
                       "references, so the drift from them starts again near 1; use one or the other")


def _forget_with_answers(cfg: UnlearnConfig) -> Any:
    """data.forget with its answers, for a baseline that trains on them; refused, saying so, without."""
    try:
        return load_qa_set(cfg.data.forget, cfg.data, "data.forget")
    except PMCError as exc:
        raise PMCError(f"method={cfg.method} trains on the forget questions' ground-truth answers (PMC never reads "
                       f"them), so data.forget must hold them: {exc}") from None


def _check_baseline_settings(cfg: UnlearnConfig, baseline: Baseline) -> None:
    unknown = sorted(set(cfg.baseline.overrides()) - set(baseline.params))
    if unknown:
        raise PMCError(f"baseline.{unknown[0]}={getattr(cfg.baseline, unknown[0])}: method={cfg.method} takes "
                       f"{', '.join(f'baseline.{p}' for p in baseline.params) or 'no beta or delta'}")


@dataclass
class UnlearnResult:
    run_dir: Path
    history: list[Any]  # EpochRecord (PMC) or BaselineEpochRecord, one per epoch
    checkpoint: Path
    references: list[str]


def run_unlearning(cfg: UnlearnConfig, session: PipelineSession | None = None,
                   inputs: UnlearnInputs | None = None) -> UnlearnResult:
    """Unlearning of cfg.model.path by cfg.method (PMC or a baseline); writes metrics.jsonl and an HF
    checkpoint under cfg.run_dir.

    A new run dir is removed again if the run fails before its first epoch is done; a failure or an
    interrupt later leaves it resumable from its last complete checkpoint, and the error says how."""
    inputs = inputs or check_unlearn(cfg)
    run_dir = Path(cfg.run_dir)
    workspace = (contextlib.nullcontext(run_dir) if inputs.resume_epoch else
                 new_workspace(run_dir, "run_dir", worth_keeping=lambda d: metric_lines(d) > 0))
    run_name = f"unlearn-{run_dir.name}" + (f"-from-epoch-{inputs.resume_epoch}" if inputs.resume_epoch else "")
    with open_trackers(cfg.report_to, cfg.tracking, run_name, config_module.to_dict(cfg)) as trackers:
        try:
            with workspace:
                return _unlearn(cfg, session, inputs, run_dir, trackers)
        except Interrupted as exc:
            raise exc.where(resume_hint(run_dir)) from None
        except PMCError as exc:
            raise PMCError(f"{exc}{resume_hint(run_dir)}") from exc


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
        final = run_dir / "checkpoint-final"
        if final.exists():  # a finished run continued to more epochs: its earlier final model is kept
            aside = run_dir / f"checkpoint-final.epoch-{inputs.resume_epoch}"
            final.rename(aside)
            log.info("%s had finished at epoch %d: its final checkpoint is kept as %s", run_dir,
                     inputs.resume_epoch, aside.name)
    else:
        atomic_write_text(run_dir / "config.yaml", config_module.to_yaml(cfg))

    retain = [inputs.formatter.example(p.question, p.answer, "retain", cfg.trainer.max_length)
              for p in inputs.retain_pairs]
    baseline = None if cfg.method == "pmc" else resolve_baseline(cfg.method)
    if baseline is None:  # a micro-batch: batch_size forget winners, as many retain (keep, refusal) examples
        rows_per_question = 2 + (cfg.pmc.lambda_align > 0) + bool(inputs.keep_questions)
    else:  # batch_size forget questions, each with its rows of the method's roles and one retain example
        rows_per_question = len(baseline.reads) + 1
        log.warning("method=%s trains on %s of the %d forget questions%s", cfg.method,
                    "the ground-truth answers" if baseline.trains_on_forget_answers else "refusal lines in place",
                    len(inputs.forget_questions),
                    " (PMC never does); summary.json and the model card record it"
                    if baseline.trains_on_forget_answers else " of their answers")
    job = trainer_job(cfg, inputs.model_source, rows_per_question * cfg.trainer.batch_size, None)  # constant lr
    completed: list[int] = []  # epochs done: a failure names the epoch it happened in
    trainer = None
    rollout = None

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
                    if cfg.needs_rollout:  # a baseline trains without sampling: an engine only to evaluate
                        rollout = session.rollout(inputs.model_source, cfg.rollout, cfg.model.dtype, cfg.seed)
                    references = [] if inputs.resume_epoch or baseline is not None else reference_answers(
                        rollout, inputs.formatter, inputs.forget_questions, cfg.pmc.reference_max_tokens)
                    keep_answers = [] if inputs.resume_epoch or not inputs.keep_questions else reference_answers(
                        rollout, inputs.formatter, inputs.keep_questions, cfg.pmc.reference_max_tokens)
                except BaseException:
                    with contextlib.suppress(Exception):
                        starting.result().shutdown(kill=True)
                    raise
                trainer = roles.trainer = starting.result()
            if rollout is not None:
                session.connect_weight_push(trainer, rollout, cfg.rollout)
            evaluator = None
            if baseline is None:
                loop: Any = PMCLoop(cfg, rollout, trainer, inputs.formatter, inputs.forget_questions, retain,
                                    references, inputs.refusals, inputs.keep_questions or (), keep_answers)
            else:
                loop = BaselineLoop(cfg, trainer, inputs.formatter, inputs.forget_questions, inputs.forget_answers,
                                    retain, inputs.refusals,
                                    push_after=lambda epoch: evaluator is not None and evaluator.due(epoch))
            atomic_write_json(run_dir / "roles.json", {  # what each role runs with, read back from it
                "trainer_ranks": trainer.effective_settings(),
                "rollout_engines": rollout.effective_settings() if rollout is not None else []})
            if inputs.resume_epoch:
                loop.load_state_dict(load_loop_state(run_dir, inputs.resume_epoch))
                trainer.load_state(str(checkpoint_dir(run_dir, inputs.resume_epoch) / "trainer"))
                if rollout is not None:
                    trainer.push_weights()
            if inputs.eval_data is not None:  # greedy TOFU metrics on the live engine, epoch 0 first
                from pmc_pipeline.eval.metrics import PeriodicEvaluator

                evaluator = PeriodicEvaluator(rollout, inputs.formatter, inputs.eval_data, cfg.evaluation.max_tokens,
                                              cfg.evaluation.eval_every, cfg.epochs, elapsed_before,
                                              cfg.evaluation.max_length,
                                              extra_scores=loop.drift if baseline is None else None)
                if not inputs.resume_epoch:
                    atomic_write_json(run_dir / "eval_before.json", evaluator.scores())

            stopping = StoppingRule.from_config(cfg.pmc)  # inactive for a baseline: check_unlearn refuses it
            stopped: dict[str, Any] = {}

            def on_epoch(record: Any) -> str | None:  # an EpochRecord (PMC) or a BaselineEpochRecord
                if evaluator is not None:
                    record.extra.update(evaluator.after_epoch(record.epoch))
                reason = stopping.reason(record.extra)
                if reason:
                    record.extra["stopped"] = reason
                    stopped.update(epoch=record.epoch, reason=reason)
                append_jsonl(metrics_path, record.as_dict())
                trackers.log(record.as_dict(), record.epoch)
                every = cfg.checkpoint_every
                if every and (record.epoch % every == 0 or record.epoch == cfg.epochs):
                    save_epoch_checkpoint(run_dir, record.epoch, trainer, loop.state_dict(), cfg.keep_checkpoints)
                completed.append(record.epoch)
                spent = time.monotonic() - loop_started  # this session's epochs, evaluation and checkpoints
                left = spent / len(completed) * (cfg.epochs - record.epoch)
                log.info("epoch %d/%d: %s; about %s left", record.epoch, cfg.epochs, record.progress(), duration(left))
                if reason:
                    log.info("epoch %d: the stopping rule ends the run (%s)", record.epoch, reason)
                return reason

            loop_started = time.monotonic()
            history = loop.run(on_epoch, start_epoch=inputs.resume_epoch + 1)
            checkpoint = run_dir / "checkpoint-final"
            trainer.save_pretrained(str(checkpoint))
            summary = unlearning_summary(cfg, len(inputs.forget_questions), len(inputs.retain_pairs))
            if stopped:
                summary["stopped"] = stopped
            atomic_write_json(checkpoint / CARD_SUMMARY, {"base_model": cfg.model.path, **summary})
            write_model_card(checkpoint, card_text(run_dir.name, cfg.model.path, summary))
        references = list(getattr(loop, "references", []))  # PMC's; a baseline has none
        if cfg.log_samples and references:
            atomic_write_json(run_dir / "references.json", [{"question": q, "reference": r} for q, r in
                                                            zip(inputs.forget_questions, references)])
        trackers.summary({"checkpoint": str(checkpoint.resolve()), "run_dir": str(run_dir.resolve()),
                          "epochs": cfg.epochs})
        atomic_write_json(run_dir / "summary.json", {  # written last: the one file that says the run is complete
            "status": "complete", "method": cfg.method, "epochs": cfg.epochs,
            "trains_on_forget_answers": summary["trains_on_forget_answers"],
            "resumed_after_epoch": inputs.resume_epoch or None, "checkpoint": checkpoint.name,
            "stopped_after_epoch": stopped.get("epoch"), "stop_reason": stopped.get("reason"),
            "final": history[-1].as_dict() if history else None,
        })
        return UnlearnResult(run_dir, history, checkpoint, references)
