"""`pmc tofu-real [smollm2] [key=value ...]`: PMC on a real model and real TOFU, every stage kept.

    setup   check the config and every job's settings; pick the forget and retain authors (20
            questions each in TOFU) and write them to <out_dir>/data (the forget questions for
            unlearning without their answers); the base model (SmolLM2-135M-Instruct or a folder)
    run     fine-tune on forget + retain authors -> evaluate it -> for each method (PMC, PMC-alignment,
            PMC-fast, ...): unlearn from that one checkpoint with greedy scores every few epochs ->
            evaluate it (greedy splits, sampling / prefill attacks, multiple-choice leakage, side
            effects against the fine-tuned model)
    report  results.md / results.json: one column per model, every utility split on its own beside
            the paper's composite, and the neighbour knowledge (real_authors, world_facts) relative to
            the fine-tuned model; curves.png (quality and each split against epoch and wall-clock
            seconds, one line per method) and pareto.png

Every stage writes its own folder under out_dir and is skipped when that folder is complete, so
running the same command again continues an interrupted benchmark (an interrupted unlearning run
resumes from its last checkpoint). An estimate of the whole run's time is logged up front and the
time left after every stage.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pmc_pipeline import config as config_module
from pmc_pipeline.data.qa import load_rows
from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.recipes.demo import job_config
from pmc_pipeline.runtime.atomic import atomic_write_json, atomic_write_text
from pmc_pipeline.runtime.progress import duration
from pmc_pipeline.schema import TofuRealConfig

log = logging.getLogger(__name__)

QUESTIONS_PER_AUTHOR = 20  # TOFU: each fictitious author has 20 question/answer pairs, in file order
TOFU_NEIGHBOUR_QUESTIONS = 117 + 100  # world_facts + real_authors
# rough seconds per unit on the 2-core machine this project develops on (SmolLM2-135M, float32), from
# the run behind benchmarks/results/tofu_real_smollm2.md: fine-tune epochs of 100 examples 153-181 s;
# PMC 1,405 s for 12 epochs x 20 questions x 4 samples (overlapped epoch); greedy answers to 337
# questions 131 s; each attack ~100 s for 20 questions x k 8. Rescaled after every stage by what it took.
UNIT_SECONDS = {"finetune_example_epoch": 1.7, "unlearn_question_sample": 1.5, "eval_question": 0.4,
                "attack_sample": 0.6}


def load_tofu_real_config(name: str, overrides: list[str]) -> TofuRealConfig:
    path = name if name.endswith((".yaml", ".yml")) else f"tofu_real/{name}"
    return config_module.load_config("tofu_real", path, overrides)


def author_rows(source: str, tofu_dir: str | None, authors: int, questions: int, setting: str) -> list[dict]:
    """The first `questions` rows of each of the first `authors` authors of a TOFU split."""
    table = load_rows(source, tofu_dir)
    if len(table.rows) < authors * QUESTIONS_PER_AUTHOR:
        raise PMCError(f"{setting}={source}: {len(table.rows)} rows hold fewer than the {authors} author(s) x "
                       f"{QUESTIONS_PER_AUTHOR} questions asked for")
    return [table.rows[a * QUESTIONS_PER_AUTHOR + q] for a in range(authors) for q in range(questions)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


class Stages:
    """The benchmark's folders and job configs, all built (and checked) before any stage runs."""

    def __init__(self, cfg: TofuRealConfig, base_model: Path):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        data = self.out / "data"
        self.files = {name: data / f"{name}.jsonl" for name in
                      ("train", "forget", "forget_questions", "forget_perturbed", "retain")}
        self.finetuned = self.out / "finetuned"
        common_data = {"tofu_dir": cfg.tofu_dir, "retain": str(self.files["retain"])}
        self.finetune = job_config("finetune", cfg.finetune, {
            "seed": cfg.seed, "model": {"path": str(base_model)}, "output_dir": str(self.finetuned),
            "data": {**common_data, "train": str(self.files["train"])}})
        evaluation = {"forget": str(self.files["forget"]), "forget_perturbed": str(self.files["forget_perturbed"]),
                      "retain_split_for_eval": str(self.files["retain"]), "retain_short_indices": None}
        self.unlearn = {}
        for method, settings in cfg.methods.items():
            merged = OmegaConf.merge(OmegaConf.create(cfg.unlearn), OmegaConf.create(settings or {}))
            self.unlearn[method] = job_config("unlearn", OmegaConf.to_container(merged), {
                "seed": cfg.seed, "model": {"path": str(self.finetuned)}, "run_dir": str(self.out / "runs" / method),
                "data": {**common_data, "forget": str(self.files["forget_questions"])},
                "evaluation": evaluation})
        self.evaluate_settings = OmegaConf.to_container(OmegaConf.merge(
            OmegaConf.create(cfg.evaluate), OmegaConf.create({"evaluation": evaluation, "seed": cfg.seed})))
        self.eval_dirs = {name: self.out / "eval" / name for name in ["finetuned", *cfg.methods]}

    def evaluate_config(self, name: str) -> Any:
        target = self.finetuned if name == "finetuned" else self.out / "runs" / name
        unlearn = config_module.to_dict(next(iter(self.unlearn.values())))  # the same engine settings
        values = {**self.evaluate_settings, "target": str(target), "output_dir": str(self.eval_dirs[name]),
                  "rollout": unlearn["rollout"], "resources": unlearn["resources"],
                  "model": {**unlearn["model"], "path": str(target if name == "finetuned" else
                                                            target / "checkpoint-final")},
                  "data": {"tofu_dir": self.cfg.tofu_dir, "retain": str(self.files["retain"]),
                           "forget": str(self.files["forget"])},
                  "probes": {**(self.evaluate_settings.get("probes") or {}),
                             "side_effect_base": None if name == "finetuned" else str(self.finetuned)}}
        try:
            return config_module.from_mapping("evaluate", values)
        except ConfigError as exc:
            raise ConfigError(f"tofu_real's evaluate section: {exc}") from None

    def estimate_seconds(self) -> dict[str, float]:
        """Rough seconds per stage from UNIT_SECONDS and the configured sizes."""
        cfg, u = self.cfg, UNIT_SECONDS
        forget_q = cfg.forget_authors * cfg.questions_per_author
        retain_q = cfg.retain_authors * cfg.questions_per_author
        train_n = forget_q + retain_q
        attack = self.evaluate_config("finetuned").attack
        greedy_q = 2 * forget_q + retain_q + TOFU_NEIGHBOUR_QUESTIONS  # forget, paraphrased, retain, neighbours
        one_eval = (greedy_q + 6 * forget_q) * u["eval_question"] + 2 * forget_q * attack.k * u["attack_sample"]
        estimate = {"finetune": self.finetune.epochs * train_n * u["finetune_example_epoch"],
                    "evaluate finetuned": one_eval}
        for method, ul in self.unlearn.items():
            evals = ul.pmc.epochs // ul.evaluation.eval_every + 1 if ul.evaluation.eval_every else 0
            estimate[f"unlearn {method}"] = (ul.pmc.epochs * forget_q * ul.sampling.num_samples
                                             * u["unlearn_question_sample"] + evals * greedy_q * u["eval_question"])
            estimate[f"evaluate {method}"] = one_eval
        return estimate

    def finished(self, stage: str) -> bool:
        """Whether a stage named as in estimate_seconds ("finetune", "unlearn pmc", ...) is complete."""
        kind, _, name = stage.partition(" ")
        if kind == "finetune":
            return (self.finetuned / "config.json").is_file()
        if kind == "evaluate":
            return (self.eval_dirs[name] / "eval.json").is_file()
        from pmc_pipeline.recipes.unlearn import run_is_complete

        return run_is_complete(Path(self.unlearn[name].run_dir), self.unlearn[name])


def run_tofu_real(cfg: TofuRealConfig, session: Any = None) -> dict[str, Any]:
    from pmc_pipeline.recipes.evaluate import check_evaluate, run_evaluation
    from pmc_pipeline.recipes.finetune import run_finetune
    from pmc_pipeline.recipes.roles import open_session
    from pmc_pipeline.recipes.unlearn import check_unlearn, prepare_run_dir, run_unlearning

    out = Path(cfg.out_dir)
    # everything is checked before out_dir is claimed: bad input leaves nothing behind
    forget = author_rows(cfg.forget_split, cfg.tofu_dir, cfg.forget_authors, cfg.questions_per_author, "forget_split")
    paraphrased = author_rows(f"{cfg.forget_split}_perturbed", cfg.tofu_dir, cfg.forget_authors,
                              cfg.questions_per_author, "forget_split")
    retain = author_rows(cfg.retain_split, cfg.tofu_dir, cfg.retain_authors, cfg.questions_per_author, "retain_split")
    base_model = out / "base-model" if cfg.model == "smollm2" else Path(cfg.model)
    stages = Stages(cfg, base_model)
    estimate = stages.estimate_seconds()  # builds the evaluate configs too
    _claim(out, cfg)
    estimate = {stage: seconds for stage, seconds in estimate.items() if not stages.finished(stage)}
    if cfg.model == "smollm2":
        from pmc_pipeline.models.smollm2 import export_smollm2

        export_smollm2(base_model)  # skipped when the folder is already there
    if not stages.files["train"].is_file():
        write_jsonl(stages.files["forget"], forget)
        write_jsonl(stages.files["forget_questions"], [{"question": r["question"]} for r in forget])
        write_jsonl(stages.files["forget_perturbed"], paraphrased)
        write_jsonl(stages.files["retain"], retain)
        write_jsonl(stages.files["train"], forget + retain)  # last: its presence says the data is complete
    log.info("tofu-real: %d forget and %d retain questions, methods %s; rough estimate of the stages to run: "
             "%s in all (%s)", len(forget), len(retain), ", ".join(cfg.methods), duration(sum(estimate.values())),
             ", ".join(f"{k} {duration(v)}" for k, v in estimate.items()) or "none left")
    clock = _StageClock(estimate)
    owns_session = session is None
    session = session or open_session(next(iter(stages.unlearn.values())))
    try:
        if not stages.finished("finetune"):
            with clock("finetune"):
                run_finetune(stages.finetune, session)
        for name in stages.eval_dirs:
            if name != "finetuned":
                ul = stages.unlearn[name]
                state = prepare_run_dir(Path(ul.run_dir), ul)
                if state != "complete":
                    ul.resume = ul.run_dir if state == "resume" else None
                    with clock(f"unlearn {name}"):
                        run_unlearning(ul, session, check_unlearn(ul))
            if not stages.finished(f"evaluate {name}"):
                ev = stages.evaluate_config(name)
                with clock(f"evaluate {name}"):
                    run_evaluation(ev, session, check_evaluate(ev))
    finally:
        if owns_session:
            session.close()
    return write_report(stages)


def _claim(out: Path, cfg: TofuRealConfig) -> None:
    """out_dir is new, or holds this same benchmark (then it continues); methods may be added to it."""
    saved = out / "tofu_real.yaml"
    current = config_module.to_dict(cfg)
    if saved.is_file():
        before = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        changed = sorted(k for k in before.keys() | current.keys() if k != "methods" and before.get(k) != current.get(k))
        changed += [f"methods.{m}" for m in before["methods"] if m in current["methods"]
                    and before["methods"][m] != current["methods"][m]]
        if changed:
            raise PMCError(f"out_dir {out} holds a tofu-real benchmark with other settings ({', '.join(changed)}; "
                           f"see {saved}); choose a new out_dir, or keep those settings (methods may be added)")
        log.info("tofu-real: continuing %s (finished stages are skipped)", out)
        added = {m: s for m, s in current["methods"].items() if m not in before["methods"]}
        if added:
            before["methods"].update(added)
            atomic_write_text(saved, OmegaConf.to_yaml(OmegaConf.create(before)))
        return
    if out.exists() and any(out.iterdir()):
        raise PMCError(f"out_dir {out} already exists and is not empty; choose a new out_dir")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, config_module.to_yaml(cfg))


class _StageClock:
    """Logs each stage's seconds and the time left, the estimate rescaled by what the stages took."""

    def __init__(self, estimate: dict[str, float]):
        self.estimate, self.spent, self.estimated_done = dict(estimate), 0.0, 0.0

    def __call__(self, stage: str) -> "_StageClock":
        self.stage = stage
        return self

    def __enter__(self) -> None:
        log.info("tofu-real: %s ...", self.stage)
        self.started = time.monotonic()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            return
        seconds = time.monotonic() - self.started
        self.spent += seconds
        self.estimated_done += self.estimate.pop(self.stage, seconds)
        left = sum(self.estimate.values()) * (self.spent / self.estimated_done if self.estimated_done else 1.0)
        log.info("tofu-real: %s took %s; about %s left", self.stage, duration(seconds), duration(left))


# -- report -------------------------------------------------------------------------------------------

def _get(results: dict[str, Any], *path: str) -> float | None:
    for key in path:
        results = results.get(key) if isinstance(results, dict) else None
    return results if isinstance(results, (int, float)) else None


METRICS = [  # (label, key in results.json, how to read it from eval.json, format)
    ("forget recall", "forget", ("forget", "rouge_l_recall"), "{:.3f}"),
    ("paraphrased forget recall", "forget_paraphrased", ("forget_paraphrased", "rouge_l_recall"), "{:.3f}"),
    ("retain recall (the trained retain authors)", "retain", ("retain_short", "rouge_l_recall"), "{:.3f}"),
    ("world_facts recall", "world_facts", ("world_facts", "rouge_l_recall"), "{:.3f}"),
    ("real_authors recall", "real_authors", ("real_authors", "rouge_l_recall"), "{:.3f}"),
    ("unlearn quality (0-100)", "unlearn_quality", ("unlearn_quality", "value"), "{:.1f}"),
    ("utility, the paper's composite (0-100)", "utility", ("utility", "value"), "{:.1f}"),
    ("sampling attack: worst-case recall", "sampling_attack", ("sampling_attack", "mean_worst_case_recall"), "{:.3f}"),
    ("prefill attack: worst-case recall", "prefill_attack", ("prefill_attack", "sampled", "mean_worst_case_recall"),
     "{:.3f}"),
    ("MC: true answer most likely", "mc_most_likely", ("mc_leakage", "true_most_likely_rate"), "{:.0%}"),
    ("MC: true answer least likely", "mc_least_likely", ("mc_leakage", "true_least_likely_rate"), "{:.0%}"),
    ("MC: chance", "mc_chance", ("mc_leakage", "chance_rate"), "{:.0%}"),
]
NEIGHBOURS = ("real_authors", "world_facts")  # knowledge next to the forget target that the composite can hide


def write_report(stages: Stages) -> dict[str, Any]:
    """results.json / results.md / curves.png / pareto.png from the stages' outputs."""
    columns: dict[str, dict[str, Any]] = {}
    for name, folder in stages.eval_dirs.items():
        results = json.loads((folder / "eval.json").read_text())
        column = {key: _get(results, *path) for _, key, path, _ in METRICS}
        effects = json.loads((folder / "side_effects.json").read_text())
        column["side_effect_mean_change"] = effects.get("mean_change")
        if name != "finetuned":
            lines = (stages.out / "runs" / name / "metrics.jsonl").read_text().splitlines()
            last = json.loads(lines[-1])
            column.update(epochs=last["epoch"], unlearn_seconds=last.get("elapsed_seconds"))
        columns[name] = column
    base = columns["finetuned"]
    for column in columns.values():  # relative change of each neighbour split vs the fine-tuned model
        for split in NEIGHBOURS:
            b, v = base.get(split), column.get(split)
            column[f"{split}_change"] = (v - b) / b if b and v is not None else None
        changes = [column[f"{s}_change"] for s in NEIGHBOURS if column[f"{s}_change"] is not None]
        column["neighbour_knowledge_change"] = sum(changes) / len(changes) if changes else None
    rows = [(label, key, fmt) for label, key, _, fmt in METRICS] + [
        ("real_authors vs fine-tuned", "real_authors_change", "{:+.0%}"),
        ("world_facts vs fine-tuned", "world_facts_change", "{:+.0%}"),
        ("neighbour knowledge vs fine-tuned (mean of the two)", "neighbour_knowledge_change", "{:+.0%}"),
        ("side effects: mean probability change of forget tokens", "side_effect_mean_change", "{:+.4f}"),
        ("PMC epochs", "epochs", "{}"), ("unlearning seconds (evaluation excluded)", "unlearn_seconds", "{:.0f}")]
    names = list(columns)
    table = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in rows:
        table.append(f"| {label} | " + " | ".join("-" if columns[n].get(key) is None else fmt.format(columns[n][key])
                                                   for n in names) + " |")
    curves = {method: curve_points(stages.out / "runs" / method) for method in stages.unlearn}
    table += ["", "Greedy scores during unlearning (every `evaluation.eval_every` epochs; neighbour changes vs "
              "the fine-tuned model's evaluation):", "", CURVE_HEADER, "|---|" + "---:|" * (len(CURVE_ROW) - 1)]
    table += [_curve_row(method, point, base) for method, points in curves.items() for point in points]
    report = {"columns": columns, "curves": curves, "settings": config_module.to_dict(stages.cfg)}
    atomic_write_json(stages.out / "results.json", report)
    atomic_write_text(stages.out / "results.md", "\n".join(table) + "\n")
    _draw_curves(curves, stages.out / "curves.png")
    from pmc_pipeline.eval.plots import draw_trials_pareto
    from pmc_pipeline.recipes.sweep import pareto_front

    points = [(n, c["unlearn_quality"], c["utility"]) for n, c in columns.items()
              if c["unlearn_quality"] is not None and c["utility"] is not None]
    front = pareto_front([(uq, u) for _, uq, u in points])
    draw_trials_pareto([(*p, f) for p, f in zip(points, front)], stages.out / "pareto.png")
    print("\n".join(table))
    print(f"\nwritten: {stages.out / 'results.md'}, results.json, curves.png, pareto.png")
    return report


SPLIT_CURVES = [("eval_unlearn_quality", "unlearn quality (0-100)"), ("eval_forget", "forget recall"),
                ("eval_forget_paraphrased", "paraphrased forget recall"), ("eval_retain_short", "retain recall"),
                ("eval_world_facts", "world_facts recall"), ("eval_real_authors", "real_authors recall")]
CURVE_ROW = [("method", "{}"), ("epoch", "{}"), ("elapsed_seconds", "{:.0f}"), ("eval_unlearn_quality", "{:.1f}"),
             ("eval_forget", "{:.3f}"), ("eval_forget_paraphrased", "{:.3f}"), ("eval_retain_short", "{:.3f}"),
             ("eval_world_facts", "{:.3f}"), ("eval_real_authors", "{:.3f}"), ("eval_utility", "{:.1f}"),
             ("world_facts_change", "{:+.0%}"), ("real_authors_change", "{:+.0%}")]
CURVE_HEADER = ("| method | epoch | seconds | quality | forget | paraphrased | retain | world_facts | real_authors "
                "| utility | world_facts vs fine-tuned | real_authors vs fine-tuned |")


def curve_points(run: Path) -> list[dict[str, Any]]:
    """The run's greedy evaluations: before unlearning (epoch 0) and every evaluated epoch."""
    points = [{"epoch": 0, "elapsed_seconds": 0.0, **json.loads((run / "eval_before.json").read_text())}]
    points += [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = [key for key, _ in CURVE_ROW[1:-2]]  # the logged ones: all but the method and the two changes
    return [{key: p.get(key) for key in keys} for p in points if p.get("eval_unlearn_quality") is not None]


def _curve_row(method: str, point: dict[str, Any], finetuned: dict[str, Any]) -> str:
    values = {"method": method, **point}
    for split in NEIGHBOURS:  # the greedy splits are the same questions as the evaluation's
        b, v = finetuned.get(split), point.get(f"eval_{split}")
        values[f"{split}_change"] = (v - b) / b if b and v is not None else None
    return "| " + " | ".join("-" if values.get(key) is None else fmt.format(values[key])
                             for key, fmt in CURVE_ROW) + " |"


def _draw_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Quality and each split against epoch (top) and wall-clock seconds (bottom), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SPLIT_CURVES), figsize=(4 * len(SPLIT_CURVES), 7), layout="constrained")
    for method, points in curves.items():
        for column, (key, title) in enumerate(SPLIT_CURVES):
            for row, x_key in enumerate(("epoch", "elapsed_seconds")):
                ax = axes[row][column]
                ax.plot([p[x_key] for p in points], [p.get(key) for p in points], marker="o", label=method)
                ax.set_title(title, fontsize="small")
                ax.set_xlabel("epoch" if row == 0 else "seconds of unlearning")
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
