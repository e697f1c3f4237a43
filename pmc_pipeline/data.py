"""Question/answer data: TOFU splits (hub or a local folder of its JSON-lines files) and user files.

A data source is either a TOFU split name ("forget10", "retain90", ...) or a path to a JSON, JSONL,
CSV or parquet file. Column names are configurable (data.question_key / data.answer_key).

Privacy: `load_forget_questions` keeps the questions only; ground-truth forget answers are never
read into the unlearning loop (a forget file may have no answer column at all).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pmc_pipeline.errors import DataError

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str


def _is_file_source(source: str) -> bool:
    return Path(source).suffix.lower() in FILE_FORMATS or "/" in source or Path(source).exists()


def _load_file(path: Path) -> list[dict[str, Any]]:
    import datasets

    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected one of {', '.join(FILE_FORMATS)}")
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read as {fmt}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return table.to_list()


def load_rows(source: str, tofu_dir: str | None, tofu_hub_id: str = "locuslab/TOFU") -> list[dict[str, Any]]:
    """Rows of a TOFU split (local folder first, else the hub) or of a user file."""
    if _is_file_source(source) and not (tofu_dir and (Path(tofu_dir) / f"{source}.json").is_file()):
        return _load_file(Path(source))
    if tofu_dir:
        folder = Path(tofu_dir)
        if not folder.is_dir():
            raise DataError(f"data.tofu_dir not found: {folder}")
        for suffix in (".json", ".jsonl"):
            if (folder / f"{source}{suffix}").is_file():
                return _load_file(folder / f"{source}{suffix}")
        available = sorted(p.stem for p in folder.glob("*.json*"))
        raise DataError(f"TOFU split '{source}' not found in {folder} (available: {', '.join(available)})")
    return _load_tofu_from_hub(tofu_hub_id, source)


def _load_tofu_from_hub(hub_id: str, split: str) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(hub_id, split, split="train").to_list()
    except Exception as exc:  # offline machines end here
        raise DataError(
            f"cannot load TOFU split '{split}' from the hub ({hub_id}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "set data.tofu_dir to a local folder of TOFU JSON-lines files"
        ) from None


def _column(rows: Sequence[dict[str, Any]], key: str, source: str, config_key: str) -> list[str]:
    if not rows:
        raise DataError(f"data source '{source}' is empty")
    if key not in rows[0]:
        raise DataError(
            f"data source '{source}': column '{key}' not found (columns: {', '.join(map(str, rows[0]))}); "
            f"set {config_key} to the right column"
        )
    values = []
    for i, row in enumerate(rows):
        value = row.get(key)
        if value is None or not str(value).strip():
            raise DataError(f"data source '{source}': row {i} has an empty '{key}'")
        values.append(str(value))
    return values


def load_qa_pairs(source: str, data_cfg: Any) -> list[QAPair]:
    """Question/answer pairs (fine-tuning and retain data)."""
    rows = load_rows(source, data_cfg.tofu_dir, data_cfg.tofu_hub_id)
    questions = _column(rows, data_cfg.question_key, source, "data.question_key")
    answers = _column(rows, data_cfg.answer_key, source, "data.answer_key")
    return [QAPair(q, a) for q, a in zip(questions, answers)]


def load_forget_questions(source: str, data_cfg: Any) -> list[str]:
    """The forget questions only: their answers are dropped here and never reach training."""
    rows = load_rows(source, data_cfg.tofu_dir, data_cfg.tofu_hub_id)
    if not rows:
        raise DataError(f"the forget set '{source}' is empty: nothing to unlearn")
    return _column(rows, data_cfg.question_key, source, "data.question_key")


def load_eval_rows(source: str, data_cfg: Any, fields: Sequence[str]) -> list[dict[str, str]]:
    """Rows restricted to `fields` (for evaluation, never for training); each field must exist."""
    rows = load_rows(source, data_cfg.tofu_dir, data_cfg.tofu_hub_id)
    columns = {field: _column(rows, field, source, f"the '{field}' field") for field in fields}
    return [{field: columns[field][i] for field in fields} for i in range(len(rows))]
