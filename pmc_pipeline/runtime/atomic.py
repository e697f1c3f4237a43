"""Outputs that never overwrite: new folders only, written under a temporary name and renamed.

Two kinds of output folder:
- products (a checkpoint, an evaluation, plots): built in a hidden temporary sibling by `atomic_dir`
  and renamed into place when complete;
- workspaces (a run dir, the demo's and bench's folders), which fill up over a long job: claimed by
  `new_workspace` and, if the job fails before it made anything worth keeping, removed again.
Both refuse a folder that exists and is not empty before anything starts (`require_new_dir`), and no
command deletes or replaces anything it did not create in the same invocation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from pmc_pipeline.errors import PMCError
from trainer.files import atomic_dir  # one implementation, re-exported here

__all__ = ["append_jsonl", "atomic_dir", "atomic_write_json", "atomic_write_text", "new_workspace",
           "require_new_dir"]


def require_new_dir(path: str | os.PathLike, key: str) -> Path:
    """`path` unless it exists and is not an empty folder: then a one-line error naming `key`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PMCError(f"{key}={path} is a file; give a new folder")
    ancestor = next(parent for parent in path.absolute().parents if parent.exists())
    if not path.exists() and not ancestor.is_dir():
        raise PMCError(f"{key}={path} cannot be made: {ancestor} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise PMCError(f"{key}={path} already exists and is not empty; choose a new {key} "
                       f"(pmc never overwrites or deletes what is there)")
    return path


@contextlib.contextmanager
def new_workspace(path: str | os.PathLike, key: str,
                  worth_keeping: Callable[[Path], bool] = lambda _: False) -> Iterator[Path]:
    """Claim `path` (new or empty) for a long job; on failure remove what this job put there unless
    `worth_keeping(path)` (e.g. a resumable checkpoint exists). A folder that existed stays."""
    path = require_new_dir(path, key)
    existed = path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if not worth_keeping(path):
            if existed:  # it was empty: everything in it is ours
                for child in path.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one line; a line is written with one call, so a crash never splits a record."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
