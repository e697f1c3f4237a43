"""The evaluation splits (TOFU layout), for evaluation only: ground-truth answers never reach training.

    forget              forget split: question -> answer
    forget_paraphrased  the forget split's `_perturbed` companion: paraphrased_question -> paraphrased_answer
    retain_short        retain split rows at the fixed indices of retain_short_indices.json (400, drawn with
                        replacement: duplicates kept), or every retain row when there is no such file
    world_facts         question -> answer
    real_authors        question -> answer
    multiple_choice     from the `_perturbed` split: question, paraphrased_answer, perturbed_answer (a list)

TOFU's standard metrics (pmc_pipeline/eval/tofu_standard.py) read `OptionSplit`s: the forget split's
`_perturbed` companion and retain_perturbed (answer, paraphrased_answer = the correct option, 5
perturbed answers), real_authors_perturbed and world_facts_perturbed (answer = the correct option,
perturbed answers), and a holdout of questions and answers never trained on.

A split named by its TOFU name that is absent from `data.tofu_dir` is skipped (its metric is null and
the reason is reported); a split that exists but lacks a field its metric needs is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmc_pipeline.data.neighbour_halves import NEIGHBOUR_SPLITS, half_rows
from pmc_pipeline.data.qa import PromptLimit, Table, check_prompt_lengths, column_strings, is_file_source, load_rows
from pmc_pipeline.errors import DataError, PMCError

UTILITY_SPLITS = ("retain_short", "world_facts", "real_authors")
GREEDY_SPLITS = ("forget", "forget_paraphrased") + UTILITY_SPLITS


@dataclass(frozen=True)
class EvalSplit:
    source: str  # split name or file
    question_field: str
    answer_field: str
    questions: list[str]
    answers: list[str]
    indices: list[int] | None = None  # rows of `source` used (retain_short), None: all
    name: str = ""  # how messages name it: "evaluation forget /data/forget10.json"
    positions: list[str] = field(default_factory=list)  # where each question is in its file


@dataclass(frozen=True)
class MultipleChoiceItem:
    question: str
    true_answer: str
    wrong_answers: list[str]


@dataclass(frozen=True)
class OptionSplit:
    """A split scored by answer likelihoods: per row the answer, the correct option the truth ratio
    compares (paraphrased_answer, or the answer itself) and the perturbed (wrong) answers."""

    name: str  # how messages name it
    source: str
    questions: list[str]
    answers: list[str]
    correct: list[str]
    perturbed: list[list[str]]
    positions: list[str]


OPTION_SPLITS = ("forget", "retain", "real_authors", "world_facts")  # TOFU's standard-metric splits


@dataclass
class EvalData:
    splits: dict[str, EvalSplit | None]
    multiple_choice: list[MultipleChoiceItem] | None
    notes: dict[str, str] = field(default_factory=dict)  # split or probe -> why absent, or where from
    options: dict[str, OptionSplit | None] = field(default_factory=dict)  # OPTION_SPLITS' data
    holdout: EvalSplit | None = None  # privacy leakage: questions and answers never trained on

    def describe(self) -> dict[str, Any]:
        return {name: ({"source": s.source, "n": len(s.questions), "fields": [s.question_field, s.answer_field]}
                       if s else {"skipped": self.notes.get(name)}) for name, s in self.splits.items()}


def wrong_answers(table: Table, name: str) -> list[list[str]]:
    """Each row's perturbed_answer: a non-empty string or a non-empty list of them."""
    options = []
    for row, position in zip(table.rows, table.positions):
        value = row.get("perturbed_answer")
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise DataError(f"{name}: {position}: 'perturbed_answer' must be a non-empty string or a list of them")
        options.append(values)
    return options


def _rows_or_none(source: str | None, data_cfg: Any) -> Table | None:
    """Rows, or None when `source` is unset or a TOFU split name that the local folder lacks."""
    if not source:
        return None
    tofu_dir = data_cfg.tofu_dir
    if tofu_dir and not is_file_source(source):
        folder = Path(tofu_dir)
        if folder.is_dir() and not any((folder / f"{source}{s}").is_file() for s in (".json", ".jsonl")):
            return None
    return load_rows(source, tofu_dir, data_cfg.tofu_hub_id)


def _split(table: Table, split: str, source: str, q_field: str, a_field: str,
           indices: list[int] | None = None) -> EvalSplit:
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(table.rows)]
        if bad:
            raise DataError(f"evaluation {split} {table.name}: indices out of range ({len(table.rows)} rows): "
                            f"e.g. {bad[0]}")
        table = table.select(indices)
    name = f"evaluation {split} {table.name}"
    questions = column_strings(table, q_field, name)
    answers = column_strings(table, a_field, name)
    return EvalSplit(source, q_field, a_field, questions, answers, indices, name, table.positions)


def check_max_length(evaluation: Any, max_model_len: int) -> None:
    """evaluation.max_length (prompt + greedy answer) must fit the engine's context."""
    if evaluation.max_length is not None and evaluation.max_length > max_model_len:
        raise PMCError(f"evaluation.max_length={evaluation.max_length} exceeds rollout.max_model_len={max_model_len}; "
                       "raise rollout.max_model_len")


def check_eval_prompts(data: EvalData, formatter: Any, limit: PromptLimit,
                       forget_limit: PromptLimit | None = None) -> None:
    """Every greedy split's prompts within `limit`; the forget split's within `forget_limit` when given
    (the attacks sample it with their own max_tokens)."""
    for split_name, split in data.splits.items():
        if split is not None:
            own = forget_limit if split_name == "forget" and forget_limit else limit
            check_prompt_lengths(split, formatter, own)


def read_indices(path: Path) -> list[int]:
    """A JSON list of row indices, or an object holding one under "indices"."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read retain_short indices: {exc}") from None
    indices = data.get("indices") if isinstance(data, dict) else data
    if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
        raise DataError(f"{path}: expected a JSON list of integers (or {{\"indices\": [...]}})")
    return indices


def _retain_indices(setting: str | None, retain_source: str, data_cfg: Any) -> tuple[list[int] | None, str]:
    if setting in (None, "", "none", "all"):
        return None, "all rows"
    if setting == "auto":
        default = Path(data_cfg.tofu_dir or "") / "retain_short_indices.json"
        if data_cfg.tofu_dir and retain_source == "retain90" and default.is_file():
            return read_indices(default), str(default)
        return None, "all rows (no retain_short_indices.json for this retain split)"
    path = Path(setting)
    if not path.is_file():
        raise DataError(f"evaluation.retain_short_indices: file not found: {path}")
    return read_indices(path), str(path)


def perturbed_source(forget: str, setting: str | None) -> str | None:
    if setting == "auto":
        return f"{Path(forget).stem}_perturbed" if not is_file_source(forget) else None
    return setting or None


def missing_option_field(table: Table, correct_field: str) -> str | None:
    """The first field TOFU's truth ratio needs that `table`'s rows lack (None: all there)."""
    return next((f for f in ("question", "answer", correct_field, "perturbed_answer") if f not in table.rows[0]), None)


def option_split(table: Table, split: str, source: str, correct_field: str) -> OptionSplit:
    """`table` as a likelihood-scored split; a row lacking a field the truth ratio needs is an error."""
    name = f"evaluation tofu_metrics {split} {table.name}"
    missing = missing_option_field(table, correct_field)
    if missing:
        raise DataError(f"{name}: {table.positions[0]}: no '{missing}' field (TOFU's truth ratio needs "
                        f"question, answer, {correct_field} and perturbed_answer)")
    return OptionSplit(name, source, column_strings(table, "question", name), column_strings(table, "answer", name),
                       column_strings(table, correct_field, name), wrong_answers(table, name), table.positions)


def _option_source(setting: str | None, default: str) -> str | None:
    """auto: TOFU's split `default` (skipped, with a note, where `data.tofu_dir` lacks it)."""
    return default if setting == "auto" else setting or None


def _load_options(eval_cfg: Any, data_cfg: Any, perturbed: str | None, perturbed_table: Table | None,
                  notes: dict[str, str]) -> dict[str, OptionSplit | None]:
    options: dict[str, OptionSplit | None] = dict.fromkeys(OPTION_SPLITS)
    if not eval_cfg.tofu_metrics:
        notes["tofu_metrics"] = "turned off (evaluation.tofu_metrics=false)"
        return options
    wanted = {"forget": (eval_cfg.forget_perturbed, perturbed, perturbed_table, "paraphrased_answer")}
    for split, setting, default in (("retain", eval_cfg.retain_perturbed, "retain_perturbed"),
                                    ("real_authors", eval_cfg.real_authors_perturbed, "real_authors_perturbed"),
                                    ("world_facts", eval_cfg.world_facts_perturbed, "world_facts_perturbed")):
        source = _option_source(setting, default)
        wanted[split] = (setting, source, _rows_or_none(source, data_cfg),
                         "paraphrased_answer" if split == "retain" else "answer")
    for split, (setting, source, table, correct_field) in wanted.items():
        if table is None:
            notes[f"tofu_{split}"] = f"split '{source}' not found" if source else "not requested"
        elif setting == "auto" and missing_option_field(table, correct_field):  # a split you named must have them
            notes[f"tofu_{split}"] = f"split '{source}' has no '{missing_option_field(table, correct_field)}' field"
        else:
            if split in NEIGHBOUR_SPLITS:
                table = _neighbour_options(table, split, eval_cfg, data_cfg)
            options[split] = option_split(table, split, source, correct_field)
    return options


def _neighbour_options(table: Table, split: str, eval_cfg: Any, data_cfg: Any) -> Table:
    """The rows of a neighbour split's _perturbed companion in the same half as the greedy split's: the two
    files must then list the same questions in the same order (TOFU's do)."""
    rows = half_rows(split, len(table.rows), eval_cfg.neighbour_half, eval_cfg.neighbour_seed)
    if rows is None:
        return table
    greedy = _rows_or_none(getattr(eval_cfg, split), data_cfg)
    if greedy is None or [r.get("question") for r in greedy.rows] != [r.get("question") for r in table.rows]:
        raise DataError(f"evaluation tofu_metrics {split} {table.name}: with evaluation.neighbour_half="
                        f"{eval_cfg.neighbour_half} it must list the questions of {getattr(eval_cfg, split)} in "
                        "the same order (one half of the same questions is taken from both)")
    return table.select(rows)


def _load_holdout(eval_cfg: Any, data_cfg: Any, forget: Table, notes: dict[str, str]) -> EvalSplit | None:
    """The holdout split; a question it shares with the forget or the retain (training) data is an error."""
    if not eval_cfg.holdout:
        notes["holdout"] = "no holdout split (set evaluation.holdout)"
        return None
    holdout = _split(load_rows(eval_cfg.holdout, data_cfg.tofu_dir, data_cfg.tofu_hub_id), "holdout",
                     eval_cfg.holdout, "question", "answer")
    trained = [forget] + ([_rows_or_none(data_cfg.retain, data_cfg)] if data_cfg.retain else [])
    seen = {row.get("question"): (table.name, position) for table in trained if table is not None
            for row, position in zip(table.rows, table.positions)}
    for question, position in zip(holdout.questions, holdout.positions):
        if question in seen:
            file, where = seen[question]
            raise DataError(f"{holdout.name}: {position}: the question is also in the training data ({file} "
                            f"{where}); a holdout must hold questions never trained on")
    return holdout


def load_eval_data(eval_cfg: Any, data_cfg: Any, forget_source: str, with_options: bool = False) -> EvalData:
    """Every split the evaluation config names; checked up front so bad data fails before any engine starts.
    `with_options`: also the likelihood-scored splits and the holdout of TOFU's standard metrics."""
    splits: dict[str, EvalSplit | None] = {name: None for name in GREEDY_SPLITS}
    notes: dict[str, str] = {}

    forget = load_rows(forget_source, data_cfg.tofu_dir, data_cfg.tofu_hub_id)
    splits["forget"] = _split(forget, "forget", forget_source, "question", "answer")

    perturbed = perturbed_source(forget_source, eval_cfg.forget_perturbed)
    perturbed_table = _rows_or_none(perturbed, data_cfg)
    multiple_choice = None
    if perturbed_table is None:
        notes["forget_paraphrased"] = notes["mc_leakage"] = f"no paraphrase split ({perturbed or 'unset'})"
    else:
        splits["forget_paraphrased"] = _split(perturbed_table, "forget_paraphrased", perturbed,
                                              "paraphrased_question", "paraphrased_answer")
        if "perturbed_answer" in perturbed_table.rows[0]:
            name = f"evaluation mc_leakage {perturbed_table.name}"
            questions = column_strings(perturbed_table, "question", name)
            true = column_strings(perturbed_table, "paraphrased_answer", name)
            wrong = wrong_answers(perturbed_table, name)
            multiple_choice = [MultipleChoiceItem(q, t, w) for q, t, w in zip(questions, true, wrong)]
        else:
            notes["mc_leakage"] = f"split '{perturbed}' has no 'perturbed_answer' field"

    retain_source = eval_cfg.retain_split_for_eval or data_cfg.retain
    retain_table = _rows_or_none(retain_source, data_cfg)
    if retain_table is None:
        notes["retain_short"] = f"split '{retain_source}' not found"
    else:
        indices, origin = _retain_indices(eval_cfg.retain_short_indices, retain_source, data_cfg)
        splits["retain_short"] = _split(retain_table, "retain_short", retain_source, "question", "answer", indices)
        notes["retain_short_indices"] = origin

    for name in NEIGHBOUR_SPLITS:
        source = getattr(eval_cfg, name)
        table = _rows_or_none(source, data_cfg)
        if table is None:
            notes[name] = f"split '{source}' not found" if source else "not requested"
        else:
            rows = half_rows(name, len(table.rows), eval_cfg.neighbour_half, eval_cfg.neighbour_seed)
            splits[name] = _split(table, name, source, "question", "answer", rows)
            if rows is not None:
                notes[f"{name}_half"] = (f"the {eval_cfg.neighbour_half} half: {len(rows)} of {len(table.rows)} "
                                         f"rows (evaluation.neighbour_seed={eval_cfg.neighbour_seed})")
    if not with_options:
        return EvalData(splits, multiple_choice, notes)
    options = _load_options(eval_cfg, data_cfg, perturbed, perturbed_table, notes)
    holdout = _load_holdout(eval_cfg, data_cfg, forget, notes) if eval_cfg.tofu_metrics else None
    return EvalData(splits, multiple_choice, notes, options, holdout)
