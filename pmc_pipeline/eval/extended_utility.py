"""Extended utility (the paper's Table 1: ARC-Easy, ARC-Challenge, MMLU) through EleutherAI's
lm-evaluation-harness, on the evaluated checkpoint (its Hugging Face backend, in this process).

`evaluation.lm_eval_tasks` takes lm-eval task names (arc_easy, arc_challenge, mmlu: their data come
from the hub) and local multiple-choice tasks written `tofu_mc:<split or file>`: rows with question,
answer and perturbed_answer (TOFU's world_facts_perturbed, real_authors_perturbed, ...), scored by
lm-eval like ARC: the log-likelihood of each option after "Question: ...\\nAnswer:".
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmc_pipeline.data.eval_splits import wrong_answers
from pmc_pipeline.data.qa import column_strings, load_rows
from pmc_pipeline.errors import ConfigError

LOCAL_PREFIX = "tofu_mc:"
METRICS = ("acc", "acc_norm")


@dataclass
class LocalTask:
    """A multiple-choice task over a split's rows, handed to lm-eval as a task config."""

    name: str
    rows: list[dict[str, Any]]  # question, choices (the true answer first), gold

    def config(self, folder: Path) -> dict[str, Any]:
        """lm-eval's task config, its rows written to a JSON-lines file in `folder`."""
        data = folder / f"{self.name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        return {
            "task": self.name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
            "metadata": {"version": 1.0},
        }


def check_lm_eval(tasks: list[str], data_cfg: Any) -> list[str | LocalTask]:
    """lm-eval installed and every local task's rows usable; returns what `run_lm_eval` takes."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("evaluation.lm_eval_tasks needs the package lm-eval==0.4.13; `make install` installs it")
    return [_local_task(name[len(LOCAL_PREFIX):], data_cfg) if name.startswith(LOCAL_PREFIX) else name
            for name in tasks]


def _local_task(source: str, data_cfg: Any) -> LocalTask:
    table = load_rows(source, data_cfg.tofu_dir, data_cfg.tofu_hub_id)
    name = f"evaluation.lm_eval_tasks {LOCAL_PREFIX}{source}"
    questions = column_strings(table, "question", name)
    answers = column_strings(table, "answer", name)
    wrong = wrong_answers(table, name)
    return LocalTask(f"tofu_mc_{Path(source).stem}",
                     [{"question": q, "choices": [a, *w], "gold": 0} for q, a, w in zip(questions, answers, wrong)])


def run_lm_eval(checkpoint: str, tasks: list[str | LocalTask], dtype: str, device: str, seed: int,
                limit: int | None) -> dict[str, dict[str, float]]:
    """{task: {"acc": ..., "acc_norm": ..., "n": examples}} for the checkpoint."""
    from lm_eval import simple_evaluate

    with tempfile.TemporaryDirectory(prefix="pmc-lm-eval-") as folder:
        configs = [task.config(Path(folder)) if isinstance(task, LocalTask) else task for task in tasks]
        output = simple_evaluate(model="hf", model_args={"pretrained": checkpoint, "dtype": dtype}, tasks=configs,
                                 device=device, batch_size=8, limit=limit, random_seed=seed, numpy_random_seed=seed,
                                 torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
                                 bootstrap_iters=0)
    scores = {}
    for task, values in output["results"].items():
        scores[task] = {metric: float(values[f"{metric},none"]) for metric in METRICS if f"{metric},none" in values}
        scores[task]["n"] = int(output["n-samples"][task]["effective"]) if task in output.get("n-samples", {}) else None
    return scores
