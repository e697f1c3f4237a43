"""Write-then-rename for folders: a failed save never leaves a half-written checkpoint behind.

Lives in `trainer` (which depends on nothing of pmc's); `pmc_pipeline.runtime.atomic` re-exports it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder, renamed to `target` on success and removed on failure.

    Never replaces anything: the rename succeeds over an empty folder only (POSIX rename), so a
    folder that gained content meanwhile is left as it is and the new one is kept under its temporary
    name, which the error names."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, target)
    except OSError as exc:
        raise FileExistsError(f"{target} already exists and is not empty; nothing there was changed, "
                              f"the new result is kept at {tmp}") from exc
