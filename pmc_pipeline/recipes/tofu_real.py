"""`pmc tofu-real [smollm2] [key=value ...]`: PMC on a real model and real TOFU, every stage kept.

    setup   check the config and every job's settings; pick the forget and retain authors (20
            questions each in TOFU) and write them to <out_dir>/data (the forget questions for
            unlearning without their answers); the base model (SmolLM2-135M-Instruct or a folder)
    run     fine-tune the base model on the retain authors only (the retain model, TOFU's reference for
            forget quality and privleak) -> evaluate it and the base model -> fine-tune on forget +
            retain authors -> evaluate it -> for each method (PMC, PMC-alignment, PMC-fast, ...):
            unlearn from that one checkpoint with greedy scores every few epochs -> evaluate it
            (greedy splits, TOFU's standard metrics against the retain model, sampling / prefill
            attacks, multiple-choice leakage, side effects against the fine-tuned model)
    report  results.md / results.json: one column per model, every utility split on its own beside
            the paper's composite, and the neighbour knowledge (real_authors, world_facts) relative to
            the fine-tuned model; curves.png (quality and each split against epoch and wall-clock
            seconds, one line per method) and pareto.png

Every stage writes its own folder under out_dir and is skipped when that folder is complete, so
running the same command again continues an interrupted benchmark (an interrupted unlearning run
resumes from its last checkpoint). An evaluation folder from before TOFU's standard metrics (no
`tofu` entry in its eval.json) is kept, renamed `<name>.pre-tofu-metrics`, and the model evaluated again.
A method's `data.keep: neighbour_selection` trains PMC's keep set on the questions of the selection
halves of real_authors and world_facts (<out_dir>/data/keep.jsonl); every evaluation must then read
the report halves (`evaluation.neighbour_half: report`), checked before anything runs. An estimate of the stages still to run is logged up front and the
time left after every stage. The report is tofu_real_report.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pmc_pipeline import config as config_module
from pmc_pipeline.data.neighbour_halves import NEIGHBOUR_SPLITS, half_rows
from pmc_pipeline.data.qa import load_rows
from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.recipes.demo import job_config
from pmc_pipeline.recipes.tofu_real_report import write_report
from pmc_pipeline.runtime.atomic import atomic_write_text
from pmc_pipeline.runtime.progress import duration
from pmc_pipeline.schema import TofuRealConfig

log = logging.getLogger(__name__)

QUESTIONS_PER_AUTHOR = 20  # TOFU: each fictitious author has 20 question/answer pairs, in file order
TOFU_NEIGHBOUR_QUESTIONS = 117 + 100  # world_facts + real_authors
REFERENCE_MODELS = ("retain-model", "base")  # evaluated before the fine-tuned model and the methods
# a method's `data.keep` here: the selection halves of real_authors and world_facts (questions only, in
# <out_dir>/data/keep.jsonl); the results are then reported on the report halves
NEIGHBOUR_SELECTION = "neighbour_selection"
# rough seconds per unit on the 2-core machine this project develops on (SmolLM2-135M, float32), from
# the run behind benchmarks/results/tofu_real_smollm2.md: fine-tune epochs of 100 examples 153-181 s;
# PMC 1,405 s for 12 epochs x 20 questions x 4 samples (overlapped epoch); greedy answers to 337
# questions 131 s; each attack ~100 s for 20 questions x k 8. Evaluation units from 2026-12-02's engine
# (all cores, prefix-cached likelihood scoring): one SmolLM2 evaluation 187-211 s (docs/evaluation.md).
# Rescaled after every stage by what it took.
UNIT_SECONDS = {"finetune_example_epoch": 1.7, "unlearn_question_sample": 1.5, "eval_question": 0.3,
                "attack_sample": 0.2}


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


def retain_perturbed_rows(cfg: TofuRealConfig, retain: list[dict]) -> list[dict]:
    """The retain authors' rows of TOFU's retain_perturbed (its 400 rows are retain90's first 400), checked
    question by question against the retain rows."""
    rows = author_rows("retain_perturbed", cfg.tofu_dir, cfg.retain_authors, cfg.questions_per_author,
                       "retain_split (TOFU's retain_perturbed holds the first 20 retain90 authors)")
    for row, kept in zip(rows, retain):
        if (row["question"], row["answer"]) != (kept["question"], kept["answer"]):
            raise PMCError(f"retain_split={cfg.retain_split}: its authors are not those of TOFU's retain_perturbed "
                           f"(question \"{kept['question'][:40]}...\" differs); TOFU's standard retain metrics need "
                           f"retain90's first authors")
    return rows


def trains_on_answers(method: str) -> bool:
    """Whether `method` (pmc or a baseline's name) trains on the true forget answers."""
    if method == "pmc":
        return False
    from pmc_pipeline.method.baselines import resolve_baseline

    return resolve_baseline(method).trains_on_forget_answers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


class Stages:
    """The benchmark's folders and job configs, all built (and checked) before any stage runs."""

    def __init__(self, cfg: TofuRealConfig, base_model: Path):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        data = self.out / "data"
        self.files = {name: data / f"{name}.jsonl" for name in
                      ("train", "forget", "forget_questions", "forget_perturbed", "retain", "retain_perturbed",
                       "holdout", "keep")}
        self.base_model, self.finetuned, self.retain_model = base_model, self.out / "finetuned", self.out / "retain-model"
        common_data = {"tofu_dir": cfg.tofu_dir, "retain": str(self.files["retain"])}
        self.finetune = job_config("finetune", cfg.finetune, {
            "seed": cfg.seed, "model": {"path": str(base_model)}, "output_dir": str(self.finetuned),
            "data": {**common_data, "train": str(self.files["train"])}})
        # the same fine-tuning on the retain authors alone: a model that never saw the forget authors
        self.finetune_retain = job_config("finetune", cfg.finetune, {
            "seed": cfg.seed, "model": {"path": str(base_model)}, "output_dir": str(self.retain_model),
            "data": {**common_data, "train": str(self.files["retain"])}})
        # TOFU's standard metrics: the retain authors' perturbed answers, and a holdout of the retain split's
        # next authors (never fine-tuned on; as many as the forget authors)
        evaluation = {"forget": str(self.files["forget"]), "forget_perturbed": str(self.files["forget_perturbed"]),
                      "retain_split_for_eval": str(self.files["retain"]), "retain_short_indices": None,
                      "retain_perturbed": str(self.files["retain_perturbed"]), "holdout": str(self.files["holdout"])}
        self.unlearn = {}
        for method, settings in cfg.methods.items():
            merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(cfg.unlearn),
                                                            OmegaConf.create(settings or {})))
            # PMC (and IDK) get the forget questions alone; the baselines that train on the answers, the answers
            forget = "forget" if trains_on_answers(merged.get("method", "pmc")) else "forget_questions"
            if (merged.get("data") or {}).get("keep") == NEIGHBOUR_SELECTION:
                merged["data"]["keep"] = str(self.files["keep"])
            self.unlearn[method] = job_config("unlearn", merged, {
                "seed": cfg.seed, "model": {"path": str(self.finetuned)}, "run_dir": str(self.out / "runs" / method),
                "data": {**common_data, "forget": str(self.files[forget])}, "evaluation": evaluation})
        self.evaluate_settings = OmegaConf.to_container(OmegaConf.merge(
            OmegaConf.create(cfg.evaluate), OmegaConf.create({"evaluation": evaluation, "seed": cfg.seed})))
        # the retain model first: every later evaluation compares with its evaluation
        self.eval_dirs = {name: self.out / "eval" / name for name in [*REFERENCE_MODELS, "finetuned", *cfg.methods]}
        self.keep_methods = [m for m, ul in self.unlearn.items() if ul.data.keep == str(self.files["keep"])]
        if self.keep_methods:
            self._check_report_half()

    def _check_report_half(self) -> None:
        """A method trained on the neighbours' selection halves is judged on the report halves only: every
        evaluation (the table's and the runs' curves) must read those, cut by the same seed."""
        seed = self.neighbour_seed()
        evaluations = {"evaluate": self.evaluate_config("finetuned").evaluation,
                       **{f"methods.{m}": ul.evaluation for m, ul in self.unlearn.items()}}
        for where, evaluation in evaluations.items():
            if (evaluation.neighbour_half, evaluation.neighbour_seed) != ("report", seed):
                raise ConfigError(
                    f"methods.{self.keep_methods[0]} trains on the selection halves of real_authors and world_facts "
                    f"(data.keep: {NEIGHBOUR_SELECTION}), so results are reported on the other halves: {where} has "
                    f"evaluation.neighbour_half={evaluation.neighbour_half}, neighbour_seed={evaluation.neighbour_seed};"
                    f" set evaluation.neighbour_half=report (neighbour_seed={seed}) in the evaluate and unlearn sections")

    def neighbour_seed(self) -> int:
        return int(self.evaluate_settings["evaluation"].get("neighbour_seed", 0))

    def keep_rows(self) -> list[dict]:
        """The keep set of NEIGHBOUR_SELECTION: the questions (no answers) of the selection halves."""
        evaluation = self.evaluate_config("finetuned").evaluation
        rows = []
        for split in NEIGHBOUR_SPLITS:
            table = load_rows(getattr(evaluation, split), self.cfg.tofu_dir)
            rows += [{"question": table.rows[i]["question"]}
                     for i in half_rows(split, len(table.rows), "selection", self.neighbour_seed())]
        return rows

    def model_folder(self, name: str) -> Path:
        return {"base": self.base_model, "retain-model": self.retain_model, "finetuned": self.finetuned}.get(
            name, self.out / "runs" / name / "checkpoint-final")

    def evaluate_config(self, name: str) -> Any:
        target = self.out / "runs" / name if name in self.unlearn else self.model_folder(name)  # a run dir: its config
        unlearn = config_module.to_dict(next(iter(self.unlearn.values())))  # the same engine settings
        evaluation = {**self.evaluate_settings["evaluation"],
                      "retain_model_eval": None if name == "retain-model" else str(self.eval_dirs["retain-model"])}
        values = {**self.evaluate_settings, "target": str(target), "output_dir": str(self.eval_dirs[name]),
                  "evaluation": evaluation, "rollout": unlearn["rollout"], "resources": unlearn["resources"],
                  "model": {**unlearn["model"], "path": str(self.model_folder(name))},
                  "data": {"tofu_dir": self.cfg.tofu_dir, "retain": str(self.files["retain"]),
                           "forget": str(self.files["forget"])},
                  "probes": {**(self.evaluate_settings.get("probes") or {}),
                             "side_effect_base": str(self.finetuned) if name in self.unlearn else None}}
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
        estimate = {"finetune retain-model": self.finetune_retain.epochs * retain_q * u["finetune_example_epoch"],
                    "evaluate retain-model": one_eval, "evaluate base": one_eval,
                    "finetune": self.finetune.epochs * train_n * u["finetune_example_epoch"],
                    "evaluate finetuned": one_eval}
        for method, ul in self.unlearn.items():
            evals = ul.epochs // ul.evaluation.eval_every + 1 if ul.evaluation.eval_every else 0
            if ul.method == "pmc":
                training = ul.epochs * forget_q * ul.sampling.num_samples * u["unlearn_question_sample"]
            else:  # each forget question's rows and a retain example, trained like fine-tuning examples
                training = ul.epochs * forget_q * 2 * u["finetune_example_epoch"]
            estimate[f"unlearn {method}"] = training + evals * greedy_q * u["eval_question"]
            estimate[f"evaluate {method}"] = one_eval
        return estimate

    def finished(self, stage: str) -> bool:
        """Whether a stage named as in estimate_seconds ("finetune", "unlearn pmc", ...) is complete."""
        kind, _, name = stage.partition(" ")
        if kind == "finetune":
            return ((self.retain_model if name == "retain-model" else self.finetuned) / "config.json").is_file()
        if kind == "evaluate":
            results = self.eval_dirs[name] / "eval.json"
            return results.is_file() and "tofu" in json.loads(results.read_text(encoding="utf-8"))
        from pmc_pipeline.recipes.unlearn_run_dir import run_is_complete

        return run_is_complete(Path(self.unlearn[name].run_dir), self.unlearn[name])


def run_tofu_real(cfg: TofuRealConfig, session: Any = None) -> dict[str, Any]:
    from pmc_pipeline.recipes.finetune import run_finetune
    from pmc_pipeline.recipes.roles import open_session
    from pmc_pipeline.recipes.unlearn import check_unlearn, run_unlearning
    from pmc_pipeline.recipes.unlearn_run_dir import prepare_run_dir

    out = Path(cfg.out_dir)
    # everything is checked before out_dir is claimed: bad input leaves nothing behind
    forget = author_rows(cfg.forget_split, cfg.tofu_dir, cfg.forget_authors, cfg.questions_per_author, "forget_split")
    paraphrased = author_rows(f"{cfg.forget_split}_perturbed", cfg.tofu_dir, cfg.forget_authors,
                              cfg.questions_per_author, "forget_split")
    retain = author_rows(cfg.retain_split, cfg.tofu_dir, cfg.retain_authors, cfg.questions_per_author, "retain_split")
    retain_perturbed = retain_perturbed_rows(cfg, retain)
    holdout = author_rows(cfg.retain_split, cfg.tofu_dir, cfg.retain_authors + cfg.forget_authors,
                          cfg.questions_per_author, "retain_split")[len(retain):]
    base_model = out / "base-model" if cfg.model == "smollm2" else Path(cfg.model)
    stages = Stages(cfg, base_model)
    estimate = stages.estimate_seconds()  # builds the evaluate configs too
    check_engine_contexts(cfg, stages)
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
        write_jsonl(stages.files["train"], forget + retain)  # its presence says the training data is complete
    for name, rows in (("retain_perturbed", retain_perturbed), ("holdout", holdout)):  # also into older out_dirs
        if not stages.files[name].is_file():
            write_jsonl(stages.files[name], rows)
    if stages.keep_methods and not stages.files["keep"].is_file():
        write_jsonl(stages.files["keep"], stages.keep_rows())
    log.info("tofu-real: %d forget and %d retain questions, methods %s; rough estimate of the stages to run: "
             "%s in all (%s)", len(forget), len(retain), ", ".join(cfg.methods), duration(sum(estimate.values())),
             ", ".join(f"{k} {duration(v)}" for k, v in estimate.items()) or "none left")
    clock = _StageClock(estimate)
    owns_session = session is None
    session = session or open_session(next(iter(stages.unlearn.values())))
    try:
        if not stages.finished("finetune retain-model"):
            with clock("finetune retain-model"):
                run_finetune(stages.finetune_retain, session)
        for name in REFERENCE_MODELS:
            evaluate_stage(stages, name, session, clock)
        if not stages.finished("finetune"):
            with clock("finetune"):
                run_finetune(stages.finetune, session)
        for name in stages.eval_dirs:
            if name in REFERENCE_MODELS:
                continue
            if name != "finetuned":
                ul = stages.unlearn[name]
                state = prepare_run_dir(Path(ul.run_dir), ul)
                if state != "complete":
                    ul.resume = ul.run_dir if state == "resume" else None
                    with clock(f"unlearn {name}"):
                        run_unlearning(ul, session, check_unlearn(ul))
            evaluate_stage(stages, name, session, clock)
    finally:
        if owns_session:
            session.close()
    return write_report(stages.out, stages.eval_dirs, list(stages.unlearn), config_module.to_dict(stages.cfg),
                        reference="retain-model")


def evaluate_stage(stages: Stages, name: str, session: Any, clock: "_StageClock") -> None:
    """Evaluate model `name` unless done; an evaluation from before TOFU's standard metrics is kept aside."""
    from pmc_pipeline.recipes.evaluate import check_evaluate, run_evaluation

    if stages.finished(f"evaluate {name}"):
        return
    folder = stages.eval_dirs[name]
    if (folder / "eval.json").is_file():
        kept = folder.with_name(f"{folder.name}.pre-tofu-metrics")
        folder.rename(kept)
        log.info("tofu-real: %s has no TOFU standard metrics; kept as %s, evaluating again", folder, kept)
    ev = stages.evaluate_config(name)
    with clock(f"evaluate {name}"):
        run_evaluation(ev, session, check_evaluate(ev))


def check_engine_contexts(cfg: TofuRealConfig, stages: Stages) -> None:
    """Every method's engine context against the base model's positions (fine-tuning keeps them), before
    anything starts."""
    from pmc_pipeline.models.source import check_context_length, model_position_limit

    if cfg.model == "smollm2":
        from pmc_pipeline.models.smollm2 import smollm2_position_limit

        limit = smollm2_position_limit()
    else:
        limit = model_position_limit(cfg.model)
    for method, ul in stages.unlearn.items():
        try:
            check_context_length(ul.rollout.max_model_len, limit, "unlearn.rollout.max_model_len")
        except ConfigError as exc:
            raise ConfigError(f"method {method}: {exc}") from None


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
