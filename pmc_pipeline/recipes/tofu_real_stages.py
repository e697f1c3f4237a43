"""`pmc tofu-real`'s stages: the benchmark's folders and every job's config (fine-tunes, one unlearning
run per method, evaluations), built and checked before any stage runs, its time estimate and which
stages are finished. tofu_real.py runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pmc_pipeline import config as config_module
from pmc_pipeline.data.neighbour_halves import NEIGHBOUR_SPLITS, half_rows
from pmc_pipeline.data.qa import load_rows
from pmc_pipeline.errors import ConfigError
from pmc_pipeline.recipes.demo import job_config
from pmc_pipeline.schema import TofuRealConfig

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


def trains_on_answers(method: str) -> bool:
    """Whether `method` (pmc or a baseline's name) trains on the true forget answers."""
    if method == "pmc":
        return False
    from pmc_pipeline.method.baselines import resolve_baseline

    return resolve_baseline(method).trains_on_forget_answers


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
            # a method's own `seed` (another draw of the same setting from the same checkpoint) wins
            self.unlearn[method] = job_config("unlearn", merged, {
                "seed": merged.get("seed", cfg.seed), "model": {"path": str(self.finetuned)},
                "run_dir": str(self.out / "runs" / method),
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
                             "side_effect_base": str(self.model_folder(self.cfg.side_effects_against))
                                                     if name in self.unlearn else None}}
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
