"""`pmc tofu-real [smollm2-neighbours] [key=value ...]`: PMC on a real model and real TOFU, every stage kept.

    setup   check the config and every job's settings; pick the forget and retain authors (20
            questions each in TOFU) and write them to <out_dir>/data (the forget questions for
            unlearning without their answers); the base model (SmolLM2-135M-Instruct or a folder)
    run     fine-tune the base model on the retain authors only (the retain model, TOFU's reference for
            forget quality and privleak) -> evaluate it and the base model -> fine-tune on forget +
            retain authors -> evaluate it -> for each method (PMC, PMC-alignment, PMC-fast, ...):
            unlearn from that one checkpoint with greedy scores every few epochs -> evaluate it
            (greedy splits, TOFU's standard metrics against the retain model, sampling / prefill
            attacks, multiple-choice leakage, side effects against the fine-tuned or the retain model);
            every training job on new trainer ranks when the benchmark opened its own session -> each
            method's chosen trial again with more seeds (`seeds_at_chosen_trial`; tofu_real_seeds.py)
    report  after every method: results.md / results.json: one column per model, every utility split on
            its own beside the paper's composite, the neighbour knowledge (real_authors, world_facts)
            relative to the fine-tuned model, each method's chosen trial over its seeds; curves.png
            (quality and each split against epoch and wall-clock seconds, one line per method),
            pareto.png and comparison.png

Every stage writes its own folder under out_dir and is skipped when that folder is complete, so
running the same command again continues an interrupted benchmark (an interrupted unlearning run
resumes from its last checkpoint). An evaluation folder from before TOFU's standard metrics (no
`tofu` entry in its eval.json) is kept, renamed `<name>.pre-tofu-metrics`, and the model evaluated again.
A method's `data.keep: neighbour_selection` trains PMC's keep set on the questions of the selection
halves of real_authors and world_facts (<out_dir>/data/keep.jsonl); every evaluation must then read
the report halves (`evaluation.neighbour_half: report`), checked before anything runs. An estimate of the stages still to run is logged up front and the
time left after every stage. The stages' configs are tofu_real_stages.py, the report tofu_real_report.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pmc_pipeline import config as config_module
from pmc_pipeline.data.qa import load_rows
from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.recipes.tofu_real_report import write_report
from pmc_pipeline.recipes.tofu_real_seeds import check_seed_names, chosen_trials, final_scores, method_of, seed_runs
from pmc_pipeline.recipes.tofu_real_stages import REFERENCE_MODELS, Stages
from pmc_pipeline.runtime.atomic import atomic_write_text
from pmc_pipeline.runtime.progress import duration
from pmc_pipeline.schema import TofuRealConfig

log = logging.getLogger(__name__)

QUESTIONS_PER_AUTHOR = 20  # TOFU: each fictitious author has 20 question/answer pairs, in file order

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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


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
    check_seed_names(cfg.methods, {trial: ul.seed for trial, ul in stages.unlearn.items()}, cfg.seeds_at_chosen_trial)
    _claim(out, cfg)
    estimate = {stage: seconds for stage, seconds in estimate.items() if not stages.finished(stage)} | \
        seeds_estimate(stages, estimate)
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

    def end_trainer_ranks() -> None:
        # a kept rank's memory grows job after job (SmolLM2: a KL unlearning run peaked at 13.1 GB on ranks
        # that had run both fine-tunes, at 7.9 GB on new ones; docs/results.md), so a benchmark that owns its
        # session starts each training job on new ranks (~20 s); a lent session's ranks are its owner's
        if owns_session:
            session.kept_ranks.close()

    # `stages` is rebound below to include the chosen trials' seed runs, so the helper takes it as an argument
    def unlearn_and_evaluate(stages: Stages, name: str) -> None:
        ul = stages.unlearn[name]
        state = prepare_run_dir(Path(ul.run_dir), ul)
        ran = state != "complete"
        if ran:
            ul.resume = ul.run_dir if state == "resume" else None
            with clock(f"unlearn {name}"):
                run_unlearning(ul, session, check_unlearn(ul))
            end_trainer_ranks()
        if evaluate_stage(stages, name, session, clock) or ran:
            write_results(stages, cfg.methods)

    try:
        if not stages.finished("finetune retain-model"):
            with clock("finetune retain-model"):
                run_finetune(stages.finetune_retain, session)
            end_trainer_ranks()
        for name in REFERENCE_MODELS:
            evaluate_stage(stages, name, session, clock)
        if not stages.finished("finetune"):
            with clock("finetune"):
                run_finetune(stages.finetune, session)
            end_trainer_ranks()
        evaluate_stage(stages, "finetuned", session, clock)
        for name in cfg.methods:
            unlearn_and_evaluate(stages, name)
        stages, runs = with_seed_runs(stages, cfg.methods)
        # seed-major: a run stopped part-way leaves every method with as many seeds as the others, or one fewer
        seeded = [family_runs[k] for k in range(1, cfg.seeds_at_chosen_trial) for family_runs in runs.values()]
        if seeded:
            clock.replan({stage: seconds for stage, seconds in stages.estimate_seconds().items()
                          if stage.partition(" ")[2] in seeded and not stages.finished(stage)})
            log.info("tofu-real: each method's chosen trial (%s), %d seeds each: %s",
                     ", ".join(r[0] for r in runs.values()), cfg.seeds_at_chosen_trial, ", ".join(seeded))
            for name in seeded:
                unlearn_and_evaluate(stages, name)
    finally:
        if owns_session:
            session.close()
    return write_results(stages, cfg.methods)


def with_seed_runs(stages: Stages, grid: dict[str, Any]) -> tuple[Stages, dict[str, list[str]]]:
    """`stages` with the seed runs of each method's chosen trial among the `grid`'s evaluated trials (the
    configured methods), and each method's runs: its chosen trial, then the trial's seed runs."""
    cfg = stages.cfg
    evaluated = [trial for trial in grid if stages.finished(f"evaluate {trial}")]
    runs: dict[str, list[str]] = {}
    seeded: dict[str, Any] = {}
    for family, trial in chosen_of_grid(stages, {t: grid[t] for t in evaluated}).items():
        extra = seed_runs(grid[trial], trial, stages.unlearn[trial].seed, cfg.seeds_at_chosen_trial)
        seeded |= extra
        runs[family] = [trial, *extra]
    if seeded:
        stages = Stages(dataclasses.replace(cfg, methods={**grid, **seeded}), stages.base_model)
    return stages, runs


def write_results(stages: Stages, grid: dict[str, Any]) -> dict[str, Any]:
    """The report of every model evaluated so far (written after each method that ran, so that a benchmark
    that spans sittings has its table as it goes): the grid's trials, and each method's chosen trial with
    its evaluated seed runs."""
    stages, runs = with_seed_runs(stages, grid)
    evaluated = {name: folder for name, folder in stages.eval_dirs.items() if stages.finished(f"evaluate {name}")}
    return write_report(stages.out, evaluated, [trial for trial in grid if trial in evaluated],
                        config_module.to_dict(stages.cfg), reference="retain-model",
                        chosen={family: [r for r in family_runs if r in evaluated] for family, family_runs in runs.items()})


def chosen_of_grid(stages: Stages, trials: dict[str, Any]) -> dict[str, str]:
    """Each method's chosen trial among `trials` (name -> method entry, each evaluated; tofu_real_seeds.py's
    rule)."""
    scores = final_scores(stages.eval_dirs, list(trials))
    finetuned_utility = final_scores(stages.eval_dirs, ["finetuned"])["finetuned"][1]
    if finetuned_utility is None:
        raise PMCError(f"{stages.eval_dirs['finetuned'] / 'eval.json'} has no utility; the chosen trials' utility "
                       f"floor is relative to it")
    families = {trial: method_of(settings) for trial, settings in trials.items()}
    return chosen_trials(scores, families, finetuned_utility, stages.cfg.chosen_utility_floor)


def seeds_estimate(stages: Stages, estimate: dict[str, float]) -> dict[str, float]:
    """The chosen trials' seed runs still to run: once every trial of the grid is evaluated, their own stages;
    before, one entry `seeds <method>` each, priced as the method's first trial (`estimate`), until replanned."""
    cfg = stages.cfg
    if cfg.seeds_at_chosen_trial <= 1:
        return {}
    if all(stages.finished(f"evaluate {trial}") for trial in cfg.methods):
        seeded, runs = with_seed_runs(stages, cfg.methods)
        names = {run for family_runs in runs.values() for run in family_runs[1:]}
        return {stage: seconds for stage, seconds in seeded.estimate_seconds().items()
                if stage.partition(" ")[2] in names and not seeded.finished(stage)}
    first: dict[str, str] = {}
    for trial, settings in cfg.methods.items():
        first.setdefault(method_of(settings), trial)
    return {f"seeds {method}": (cfg.seeds_at_chosen_trial - 1) * (estimate[f"unlearn {trial}"] + estimate[f"evaluate {trial}"])
            for method, trial in first.items()}


def evaluate_stage(stages: Stages, name: str, session: Any, clock: "_StageClock") -> bool:
    """Evaluate model `name` unless done (then False); an evaluation from before TOFU's standard metrics is kept
    aside."""
    from pmc_pipeline.recipes.evaluate import check_evaluate, run_evaluation

    if stages.finished(f"evaluate {name}"):
        return False
    folder = stages.eval_dirs[name]
    if (folder / "eval.json").is_file():
        kept = folder.with_name(f"{folder.name}.pre-tofu-metrics")
        folder.rename(kept)
        log.info("tofu-real: %s has no TOFU standard metrics; kept as %s, evaluating again", folder, kept)
    ev = stages.evaluate_config(name)
    with clock(f"evaluate {name}"):
        run_evaluation(ev, session, check_evaluate(ev))
    return True


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


GROWS = ("methods", "seeds_at_chosen_trial")  # settings a benchmark's out_dir takes new values of


def _claim(out: Path, cfg: TofuRealConfig) -> None:
    """out_dir is new, or holds this same benchmark (then it continues); methods may be added to it and
    seeds_at_chosen_trial raised."""
    saved = out / "tofu_real.yaml"
    current = config_module.to_dict(cfg)
    if saved.is_file():
        before = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        # a setting added to pmc after the out_dir was made counts as its default there
        defaults = {f.name: f.default for f in dataclasses.fields(TofuRealConfig) if f.default is not dataclasses.MISSING}
        changed = sorted(k for k in before.keys() | current.keys()
                         if k not in GROWS and before.get(k, defaults.get(k)) != current.get(k))
        changed += [f"methods.{m}" for m in before["methods"] if m in current["methods"]
                    and before["methods"][m] != current["methods"][m]]
        if changed:
            raise PMCError(f"out_dir {out} holds a tofu-real benchmark with other settings ({', '.join(changed)}; "
                           f"see {saved}); choose a new out_dir, or keep those settings (methods may be added, "
                           f"seeds_at_chosen_trial raised)")
        seeds_before = before.get("seeds_at_chosen_trial", defaults["seeds_at_chosen_trial"])
        if current["seeds_at_chosen_trial"] < seeds_before:
            raise PMCError(f"seeds_at_chosen_trial={current['seeds_at_chosen_trial']} is below out_dir {out}'s "
                           f"{seeds_before}: the count may only grow (its seed runs are kept)")
        log.info("tofu-real: continuing %s (finished stages are skipped)", out)
        added = {m: s for m, s in current["methods"].items() if m not in before["methods"]}
        if added or seeds_before != current["seeds_at_chosen_trial"]:
            before["methods"].update(added)
            before["seeds_at_chosen_trial"] = current["seeds_at_chosen_trial"]
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

    def replan(self, stages: dict[str, float]) -> None:
        """The chosen trials' seeds are known: their stages replace the `seeds <method>` placeholders."""
        self.estimate = {k: v for k, v in self.estimate.items() if not k.startswith("seeds ")} | stages

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
