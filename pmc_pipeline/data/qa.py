"""Question/answer data: TOFU splits (hub or a local folder of its JSON-lines files) and user files.

A data source is either a TOFU split name ("forget10", "retain90", ...) or a path to a JSON, JSONL,
CSV or parquet file. Column names are configurable (data.question_key / data.answer_key).

Every file is checked as it is read, before any engine starts: UTF-8 text, valid JSON on every line,
at least one row, and a non-empty string in every column used. Errors name the file, the row and
the field. Rows are named "line N" (1-based) in JSON lines, "index N" (0-based) in a .json file that
holds one JSON array, and "row N" (1-based, header not counted) in CSV, parquet and hub splits.

Privacy: `load_forget_set` keeps the questions only; ground-truth forget answers are never read
into the unlearning loop (a forget file may have no answer column at all).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from pmc_pipeline.errors import DataError, first_line

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str


@dataclass(frozen=True)
class Table:
    """The rows of one data source and where each row is in it (for error messages)."""

    name: str  # the file read, or the hub split
    rows: list[dict[str, Any]]
    positions: list[str]  # "line 17", "index 3" or "row 5"

    def select(self, indices: Sequence[int]) -> Table:
        return Table(self.name, [self.rows[i] for i in indices], [self.positions[i] for i in indices])


@dataclass(frozen=True)
class DataSet:
    """The checked questions (and answers) of one source."""

    name: str  # how messages name it: the setting and the file, e.g. "data.retain /data/retain90.json"
    questions: list[str]
    positions: list[str]  # where each question is in the file
    answers: list[str] | None = None  # None for a forget set: its answers are never read
    duplicates: int = 0  # questions that repeat an earlier one (kept)

    @property
    def pairs(self) -> list[QAPair]:
        return [QAPair(q, a) for q, a in zip(self.questions, self.answers or [])]


def is_file_source(source: str) -> bool:
    return Path(source).suffix.lower() in FILE_FORMATS or "/" in source or Path(source).exists()


def _describe(value: Any) -> str:
    """A JSON-style name of what a value is, for "expected X, got Y" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string" if value.strip() else "a blank string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                        f"(line {line}); save the file as UTF-8") from None


def _json_object(value: Any, path: Path, position: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{path}: {position}: expected a JSON object, got {_describe(value)}")
    return value


def _json_lines(path: Path, text: str) -> Table:
    rows, positions = [], []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators unescaped
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = (" (a .json file holds JSON lines, one object per line, or one JSON array of objects)"
                    if path.suffix.lower() == ".json" else "")
            raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno}){hint}") from None
        rows.append(_json_object(value, path, f"line {number}"))
        positions.append(f"line {number}")
    return Table(str(path), rows, positions)


def _json_array(path: Path, text: str) -> Table:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    positions = [f"index {i}" for i in range(len(items))]
    return Table(str(path), [_json_object(item, path, p) for item, p in zip(items, positions)], positions)


def _read_with_datasets(path: Path, fmt: str, **options: Any) -> Table:
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(fmt, data_files=str(path), split="train", **options).to_list()
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read as {fmt}: {first_line(exc)}") from None
    return Table(str(path), rows, [f"row {i}" for i in range(1, len(rows) + 1)])


def _read_csv(path: Path, text: str) -> Table:
    import datasets

    records = csv.reader(io.StringIO(text))
    header = next(records, [])
    if not any(records):  # a header alone: datasets fails instead of reading no rows
        return Table(str(path), [], [])
    # every cell as the text it is: no numbers inferred, no "NA" or "None" turned into nulls
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return _read_with_datasets(path, "csv", features=features, na_filter=False)


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_metadata(path).num_rows
    except Exception as exc:  # not a parquet file
        raise DataError(f"{path}: cannot read as parquet: {first_line(exc)}") from None
    # no rows: datasets fails instead of reading none
    return _read_with_datasets(path, "parquet") if rows else Table(str(path), [], [])


def _load_file(path: Path) -> Table:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected one of {', '.join(FILE_FORMATS)}")
    if path.stat().st_size == 0:
        return Table(str(path), [], [])
    if fmt == "parquet":
        return _read_parquet(path)
    text = _decode(path)
    if fmt == "csv":
        return _read_csv(path, text)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _json_array(path, text)
    return _json_lines(path, text)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of one JSON/JSON-lines/CSV/parquet file, checked as every data file is."""
    return _load_file(Path(path)).rows


def load_rows(source: str, tofu_dir: str | None, tofu_hub_id: str = "locuslab/TOFU") -> Table:
    """Rows of a TOFU split (local folder first, else the hub) or of a user file."""
    if is_file_source(source) and not (tofu_dir and (Path(tofu_dir) / f"{source}.json").is_file()):
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


def _load_tofu_from_hub(hub_id: str, split: str) -> Table:
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(hub_id, split, split="train").to_list()
    except Exception as exc:  # offline machines end here
        raise DataError(
            f"cannot load TOFU split '{split}' from the hub ({hub_id}): {first_line(exc)}; "
            "set data.tofu_dir to a local folder of TOFU JSON-lines files"
        ) from None
    return Table(f"TOFU split '{split}' ({hub_id})", rows, [f"row {i}" for i in range(1, len(rows) + 1)])


def column_strings(table: Table, key: str, name: str, key_setting: str | None = None) -> list[str]:
    """Every row's `key`, each a non-empty string; `name` prefixes messages, `key_setting` picks the column."""
    if not table.rows:
        raise DataError(f"{name} has no rows")
    if not any(key in row for row in table.rows):
        columns = ", ".join(dict.fromkeys(str(k) for row in table.rows for k in row))
        fix = f"; set {key_setting} to the right column" if key_setting else ""
        raise DataError(f"{name}: column '{key}' not found (columns: {columns}){fix}")
    values = []
    for row, position in zip(table.rows, table.positions):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            got = _describe(value) if key in row else "missing"
            raise DataError(f"{name}: {position}: '{key}' is {got}; expected a non-empty string")
        values.append(value)
    return values


def _rows_of_setting(source: str, data_cfg: Any, setting: str) -> Any:
    try:
        return load_rows(source, data_cfg.tofu_dir, data_cfg.tofu_hub_id)
    except DataError as exc:  # a missing split's message names the folder; say which setting asked for it
        if str(exc).startswith(source):  # a file's own problem: the message starts with its path
            raise
        raise DataError(f"{setting}: {exc}") from None


def load_qa_set(source: str, data_cfg: Any, setting: str) -> DataSet:
    """Question/answer pairs (fine-tuning and retain data); `setting` (e.g. "data.retain") names the source."""
    table = _rows_of_setting(source, data_cfg, setting)
    name = f"{setting} {table.name}"
    questions = column_strings(table, data_cfg.question_key, name, "data.question_key")
    answers = column_strings(table, data_cfg.answer_key, name, "data.answer_key")
    return DataSet(name, questions, table.positions, answers)


def load_forget_set(source: str, data_cfg: Any, setting: str = "data.forget") -> DataSet:
    """The forget questions only: their answers are never read and never reach training. Also the keep
    set's questions (`setting` "data.keep"): its targets are the starting model's own answers."""
    table = _rows_of_setting(source, data_cfg, setting)
    name = f"{setting} {table.name}"
    questions = column_strings(table, data_cfg.question_key, name, "data.question_key")
    duplicates = len(questions) - len(set(questions))
    if duplicates:
        # kept: each copy is sampled and trained on, so a repeated question weighs more
        log.warning("%s: %d duplicate questions (kept)", name, duplicates)
    return DataSet(name, questions, table.positions, duplicates=duplicates)


# -- prompt lengths ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptLimit:
    """The most prompt tokens a job allows, the settings that make it, and how to allow more."""

    tokens: int
    why: str  # e.g. "rollout.max_model_len - sampling.max_tokens"
    fix: str  # e.g. "raise rollout.max_model_len"


def engine_limit(max_model_len: int, answer_tokens: dict[str, int]) -> PromptLimit:
    """vLLM holds prompt + answer in max_model_len: a longer prompt fails, a longer sum cuts answers short.

    `answer_tokens` maps each max_tokens setting the engine serves these prompts with to its value."""
    setting, tokens = max(answer_tokens.items(), key=lambda item: item[1])
    return PromptLimit(max_model_len - tokens, f"rollout.max_model_len - {setting}",
                       f"raise rollout.max_model_len or lower {setting}")


def trainer_limit(max_length: int) -> PromptLimit:
    """Training examples are cut to max_length from the end: the prompt must leave one answer token."""
    return PromptLimit(max_length - 1, "trainer.max_length - 1",
                       "raise trainer.max_length (a prompt must leave room for at least one answer token)")


class NamedQuestions(Protocol):
    """A DataSet or an evaluation split."""

    name: str
    questions: list[str]
    positions: list[str]


def check_prompt_lengths(data: NamedQuestions, formatter: Any, *limits: PromptLimit) -> None:
    """Every question's formatted prompt (`formatter.prompt_ids`) within the tightest of `limits`."""
    limit = min(limits, key=lambda item: item.tokens)
    lengths = [len(formatter.prompt_ids(q)) for q in data.questions]
    too_long = [i for i, n in enumerate(lengths) if n > limit.tokens]
    if too_long:
        longest = max(too_long, key=lengths.__getitem__)
        have = "question has a prompt" if len(too_long) == 1 else "questions have prompts"
        raise DataError(f"{data.name}: {len(too_long)} {have} longer than {limit.why} = {limit.tokens} tokens "
                        f"(longest {lengths[longest]}, {data.positions[longest]}); {limit.fix}")
