"""`pmc evaluate <checkpoint or run dir> [key=value ...]`: everything the paper measures, on one engine.

1. find the checkpoint (a run dir's `checkpoint-final/`, or a Hugging Face folder), take a run dir's
   config (prompt format, data, evaluation splits) as defaults, check every input
2. start one vLLM engine (PipelineSession) on the checkpoint
3. greedy TOFU metrics (the PMC paper's), TOFU's standard likelihood metrics (truth ratio, probability,
   model utility, extraction strength, forget quality and privleak against a retain model's earlier
   evaluation), sampling attack, prefilling attack, multiple-choice leakage; then the side-effect
   probe, which also loads the base checkpoint (a run dir's model.path) into the same engine
4. write eval.json, tofu_examples.jsonl, side_effects.json, settings.json and report.md (atomically,
   into a new folder), the evaluated checkpoint's model card, and print a table. Forget questions and
   answers go to those files only, never to the console.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pmc_pipeline import config as config_module
from pmc_pipeline.data.eval_splits import EvalData, check_eval_prompts, check_max_length, load_eval_data
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.data.qa import engine_limit
from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.eval.report import report_markdown, results_table
from pmc_pipeline.eval.attacks import prefill_attack, sampling_attack
from pmc_pipeline.eval.extended_utility import check_lm_eval, run_lm_eval
from pmc_pipeline.eval.metrics import greedy_metrics
from pmc_pipeline.eval.model_card import SUMMARY as CARD_SUMMARY, card_text, write_model_card
from pmc_pipeline.eval.probes import (forget_specific_tokens, load_side_effect_text, multiple_choice_leakage,
                                      side_effect_summary, text_windows, token_probabilities)
from pmc_pipeline.eval.tofu_standard import (EXAMPLES_FILE, RetainModelEval, load_retain_model_eval, option_means,
                                             tofu_standard_metrics)
from pmc_pipeline.models.source import (architecture_signature, check_context_length, load_tokenizer,
                                       model_position_limit, validate_model_folder)
from pmc_pipeline.runtime.atomic import atomic_dir, atomic_write_json, atomic_write_text
from pmc_pipeline.runtime.progress import ProgressRollout
from pmc_pipeline.schema import EvaluateConfig
from pmc_pipeline.tracking import flatten, open_trackers

log = logging.getLogger(__name__)

EVAL_KEYS = ("forget", "forget_paraphrased", "retain_short", "world_facts", "real_authors", "unlearn_quality",
             "utility", "tofu", "sampling_attack", "prefill_attack", "mc_leakage", "lm_eval")
FINAL_CHECKPOINT = "checkpoint-final"
RUN_KEYS_INHERITED = ("model", "data", "evaluation", "rollout", "resources", "seed")


@dataclass(frozen=True)
class Target:
    checkpoint: Path
    run_dir: Path | None


def resolve_target(target: str) -> Target:
    """A run dir (holding checkpoint-final/) or a Hugging Face checkpoint folder (holding config.json)."""
    path = Path(target)
    if not path.exists():
        raise PMCError(f"checkpoint or run dir not found: {path}")
    if (path / FINAL_CHECKPOINT / "config.json").is_file():
        return Target(path / FINAL_CHECKPOINT, path)
    if (path / "config.json").is_file():
        return Target(path, None)
    if (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file():
        raise PMCError(f"run dir {path} has no {FINAL_CHECKPOINT}/ (the run did not finish?)")
    raise PMCError(f"{path} is neither a run dir (with {FINAL_CHECKPOINT}/) nor a checkpoint (with config.json)")


# `preset=<name>` on the command line: settings given together (later overrides still win)
PRESETS = {
    # the PMC reference code's evaluation: generation limit over prompt + answer (max_length 200), its plain
    # prompt ("Question: {q}\n", a leading "Answer:" stripped), bfloat16 (docs/evaluation.md)
    "paper": ["evaluation.max_length=200", "model.plain_prompt=reference", "model.dtype=bfloat16"],
}


def expand_presets(overrides: list[str]) -> list[str]:
    """`preset=<name>` replaced by its settings, placed first so that the other overrides win."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("preset=")]
    unknown = [name for name in chosen if name not in PRESETS]
    if unknown:
        raise ConfigError(f"preset={unknown[0]}: no such preset; choose one of: {', '.join(PRESETS)}")
    return [s for name in chosen for s in PRESETS[name]] + [o for o in overrides if not o.startswith("preset=")]


def load_evaluate_config(target: str, overrides: list[str] | None = None) -> EvaluateConfig:
    """Schema defaults <- the run dir's config.yaml (when a run dir is given) <- a preset <- command-line overrides."""
    found = resolve_target(target)
    values: dict[str, Any] = {}
    if found.run_dir is not None and (found.run_dir / "config.yaml").is_file():
        run_cfg = OmegaConf.to_container(OmegaConf.load(found.run_dir / "config.yaml"), resolve=True)
        values = {k: run_cfg[k] for k in RUN_KEYS_INHERITED if k in run_cfg}
        if "model" in values:  # the model that was unlearned is the side-effect probe's base
            values["probes"] = {"side_effect_base": values["model"].get("path")}
            values["model"] = {k: v for k, v in values["model"].items() if k != "gguf_file"}
    values.setdefault("model", {})["path"] = str(found.checkpoint)
    values["target"] = target
    return config_module.from_mapping("evaluate", values, expand_presets(list(overrides or [])))


@dataclass
class EvaluateInputs:
    target: Target
    formatter: PromptFormatter
    data: EvalData
    side_effect_base: str | None
    side_effect_text: tuple[str, str] | None
    output_dir: Path
    lm_eval_tasks: list[Any]  # what extended_utility.run_lm_eval takes (names, local task configs)
    retain_model: RetainModelEval | None = None  # forget quality's and privleak's reference


def check_evaluate(cfg: EvaluateConfig) -> EvaluateInputs:
    """Every input checked before an engine starts or a file is written."""
    target = resolve_target(cfg.target)
    checkpoint = Path(cfg.model.path)
    validate_model_folder(str(checkpoint), trainer=False, model_impl=cfg.rollout.model_impl)  # only the engine loads it
    check_context_length(cfg.rollout.max_model_len, model_position_limit(str(checkpoint)))
    formatter = PromptFormatter.for_model(load_tokenizer(str(checkpoint)), cfg.model)
    data = load_eval_data(cfg.evaluation, cfg.data, cfg.evaluation.forget or cfg.data.forget, with_options=True)
    retain_model = load_retain_model_eval(cfg.evaluation.retain_model_eval, data.options.get("forget"))
    greedy = {"evaluation.max_tokens": cfg.evaluation.max_tokens}
    check_max_length(cfg.evaluation, cfg.rollout.max_model_len)
    attacks = {"attack.max_tokens": cfg.attack.max_tokens} if cfg.attack.sampling or cfg.attack.prefill else {}
    check_eval_prompts(data, formatter, engine_limit(cfg.rollout.max_model_len, greedy),
                       engine_limit(cfg.rollout.max_model_len, {**greedy, **attacks}))
    base, text = cfg.probes.side_effect_base, None
    if base:
        if not (Path(base) / "config.json").is_file():
            raise PMCError(f"probes.side_effect_base {base}: not a checkpoint folder (no config.json)")
        validate_model_folder(base, trainer=False, setting="probes.side_effect_base", model_impl=cfg.rollout.model_impl)
        if architecture_signature(base) != architecture_signature(str(checkpoint)):
            raise PMCError(f"probes.side_effect_base {base}: a different architecture than {checkpoint}")
        text = load_side_effect_text(cfg.probes.side_effect_text)
    default_out = (target.run_dir if target.run_dir else target.checkpoint.parent /
                   f"{target.checkpoint.name}-eval") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = Path(cfg.output_dir) if cfg.output_dir else default_out
    if output_dir.exists() and any(output_dir.iterdir()):
        raise PMCError(f"output_dir {output_dir} already exists and is not empty; choose a new output_dir")
    lm_eval_tasks = check_lm_eval(cfg.evaluation.lm_eval_tasks, cfg.data) if cfg.evaluation.lm_eval_tasks else []
    return EvaluateInputs(target, formatter, data, base, text, output_dir, lm_eval_tasks, retain_model)


@dataclass
class LoadedEvaluation:
    results: dict[str, Any]  # eval.json's content
    tofu_rows: list[dict[str, Any]]  # TOFU's per-example values (tofu_examples.jsonl)
    phase_seconds: dict[str, float]


def evaluate_loaded_model(rollout: Any, formatter: PromptFormatter, data: EvalData, cfg: EvaluateConfig,
                          retain_model: RetainModelEval | None = None) -> LoadedEvaluation:
    """Everything measured on the model the engine holds now (no side-effect probe)."""
    a, seconds = cfg.attack, {}
    rollout = ProgressRollout(rollout)  # each long engine call reports counts and an ETA
    start = time.perf_counter()
    e = cfg.evaluation
    results = greedy_metrics(rollout.phase("evaluation: greedy answers"), formatter, data, e.max_tokens,
                             max_length=e.max_length)
    seconds["greedy"] = time.perf_counter() - start
    results["tofu"], tofu_rows = None, []
    if any(data.options.values()) or data.holdout is not None:
        start = time.perf_counter()
        results["tofu"], tofu_rows = tofu_standard_metrics(rollout.phase("evaluation: TOFU likelihood metrics"),
                                                           formatter, data, results, e.max_tokens, retain_model,
                                                           e.max_length)
        seconds["tofu_metrics"] = time.perf_counter() - start
    forget = data.splits["forget"]
    attack_args = dict(k=a.k, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, seed=cfg.seed)
    results["sampling_attack"] = results["prefill_attack"] = results["mc_leakage"] = None
    if a.sampling:
        start = time.perf_counter()
        attack = sampling_attack(rollout.phase(f"evaluation: sampling attack (k={a.k})"), formatter,
                                 forget.questions, forget.answers, **attack_args)
        results["sampling_attack"] = {"temperature": a.temperature, "top_p": a.top_p,
                                      **attack.as_dict(forget.questions, forget.answers)}
        seconds["sampling_attack"] = time.perf_counter() - start
    if a.prefill:
        start = time.perf_counter()
        results["prefill_attack"] = prefill_attack(rollout.phase("evaluation: prefill attack"), formatter,
                                                   forget.questions, forget.answers, a.prefix, **attack_args)
        seconds["prefill_attack"] = time.perf_counter() - start
    if cfg.probes.multiple_choice and data.multiple_choice:
        start = time.perf_counter()
        # both read the forget split's `_perturbed` rows: its TOFU options are the probe's, already scored
        scored = option_means(tofu_rows) if data.options.get("forget") is not None else None
        results["mc_leakage"] = multiple_choice_leakage(rollout.phase("evaluation: multiple-choice probe"), formatter,
                                                        data.multiple_choice, scored)
        seconds["mc_leakage"] = time.perf_counter() - start
    log.info("evaluation phases: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return LoadedEvaluation({key: results.get(key) for key in EVAL_KEYS}, tofu_rows,
                            {k: round(v, 1) for k, v in seconds.items()})


def side_effects(rollout: Any, inputs: EvaluateInputs, cfg: EvaluateConfig) -> dict[str, Any]:
    """Probabilities of forget-specific tokens in unrelated text: the engine's model, then the base.

    Leaves the base model loaded in the engine."""
    if not inputs.side_effect_base or inputs.side_effect_text is None:
        return {"skipped": "no base checkpoint to compare with (set probes.side_effect_base)"}
    retain = inputs.data.splits.get("retain_short")
    tokens = forget_specific_tokens(inputs.formatter, inputs.data.splits["forget"].answers,
                                    retain.answers if retain else [])
    text, source = inputs.side_effect_text
    windows = text_windows(inputs.formatter, text, cfg.probes.side_effect_window)
    rollout = ProgressRollout(rollout)
    unlearned = token_probabilities(rollout.phase("side effects: unlearned model"), windows, tokens)
    rollout.load_checkpoint(inputs.side_effect_base)
    base = token_probabilities(rollout.phase("side effects: base model"), windows, tokens)
    return {"base": inputs.side_effect_base, "unlearned": str(inputs.target.checkpoint),
            **side_effect_summary(base, unlearned, len(tokens), source)}



@dataclass
class EvaluationResult:
    output_dir: Path
    results: dict[str, Any]
    side_effects: dict[str, Any]
    table: str


def run_evaluation(cfg: EvaluateConfig, session: Any = None, inputs: EvaluateInputs | None = None) -> EvaluationResult:
    from pmc_pipeline.runtime.session import PipelineSession

    inputs = inputs or check_evaluate(cfg)
    checkpoint = str(inputs.target.checkpoint)
    owns_session = session is None
    res = cfg.resources  # one engine and no trainer: no placement plan needed
    session = session or PipelineSession(res.ray_address, res.num_cpus, use_gpus=config_module.use_gpus(cfg),
                                         placement_timeout_s=res.placement_timeout_s,
                                         call_timeout_s=res.call_timeout_s)
    started = time.perf_counter()
    run_name = f"evaluate-{Path(inputs.output_dir).name}"
    with open_trackers(cfg.report_to, cfg.tracking, run_name, config_module.to_dict(cfg)) as trackers:
        try:
            rollout = session.rollout(checkpoint, cfg.rollout, cfg.model.dtype, cfg.seed)
            loaded = evaluate_loaded_model(rollout, inputs.formatter, inputs.data, cfg, inputs.retain_model)
            results = loaded.results
            effects = side_effects(rollout, inputs, cfg)
        finally:
            if owns_session:
                session.close()
        if inputs.lm_eval_tasks:  # in this process, on the checkpoint's HF weights (the engines are done)
            log.info("evaluation: lm-evaluation-harness on %d task(s)", len(inputs.lm_eval_tasks))
            results["lm_eval"] = run_lm_eval(checkpoint, inputs.lm_eval_tasks, cfg.model.dtype,
                                             "cuda" if config_module.use_gpus(cfg) else "cpu", cfg.seed,
                                             cfg.evaluation.lm_eval_limit)
        trackers.log(flatten(results), 0)  # eval.json's numbers (no texts)
        trackers.summary({"checkpoint": checkpoint, "output_dir": str(Path(inputs.output_dir).resolve())})
    settings = {
        "target": cfg.target, "checkpoint": checkpoint, "seconds": round(time.perf_counter() - started, 1),
        "phase_seconds": loaded.phase_seconds,
        "data": inputs.data.describe(), "data_notes": inputs.data.notes,
        "attack": asdict(cfg.attack), "probes": asdict(cfg.probes),
        "greedy_max_tokens": cfg.evaluation.max_tokens, "greedy_max_length": cfg.evaluation.max_length,
        "model_dtype": cfg.model.dtype, "seed": cfg.seed,
    }
    table = results_table({"value": results})
    with atomic_dir(inputs.output_dir) as tmp:
        atomic_write_json(tmp / "eval.json", results)
        atomic_write_text(tmp / EXAMPLES_FILE, "".join(json.dumps(row) + "\n" for row in loaded.tofu_rows))
        atomic_write_json(tmp / "side_effects.json", effects)
        atomic_write_json(tmp / "settings.json", settings)
        atomic_write_text(tmp / "report.md", report_markdown(results, effects, settings))
    update_model_card(inputs.target, results, inputs.output_dir)
    return EvaluationResult(inputs.output_dir, results, effects, table)


def update_model_card(target: Target, results: dict[str, Any], output_dir: Path) -> Path | None:
    """The evaluated checkpoint's model card with this evaluation's numbers (into `output_dir` instead
    when the checkpoint holds a README.md that pmc did not write)."""
    summary_file = target.checkpoint / CARD_SUMMARY
    unlearning = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else None
    name = target.run_dir.name if target.run_dir else target.checkpoint.name
    text = card_text(name, unlearning.pop("base_model") if unlearning else None, unlearning, results)
    return write_model_card(target.checkpoint, text, fallback_dir=output_dir)
