"""Per-epoch resumable checkpoints of a PMC run, and finding the last complete one.

    <run_dir>/checkpoints/epoch-0003/
        trainer/          every rank's DeepSpeed state (weights shard, AdamW, lr schedule, RNG)
        loop_state.json   references, batching RNG, PMC-fast cache, restart state
        complete.json     written last: only a folder with it counts

A checkpoint is assembled in a hidden temp folder and renamed into place once complete, so a crash
never leaves a partial checkpoint that looks complete. The loop state holds the reward's reference
answers (the original model's answers to the forget questions), which resuming needs; like the
weights, it stays in the run directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pmc_pipeline.runtime.atomic import atomic_write_json

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"epoch-{epoch:04d}"


def save_epoch_checkpoint(run_dir: Path, epoch: int, trainer: Any, loop_state: dict[str, Any], keep: int) -> Path:
    """Write epoch `epoch`'s checkpoint atomically, then drop all but the newest `keep` ones."""
    target = checkpoint_dir(run_dir, epoch)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        trainer.save_state(str(tmp / "trainer"))  # every rank writes its own shard here
        atomic_write_json(tmp / "loop_state.json", loop_state)
        atomic_write_json(tmp / COMPLETE, {"epoch": epoch})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(checkpoint_dir(run_dir, old), ignore_errors=True)
    return target


def complete_checkpoints(run_dir: Path) -> list[int]:
    """Epochs with a complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    epochs = []
    for folder in root.glob("epoch-*"):
        marker = folder / COMPLETE
        if marker.is_file():
            epochs.append(int(json.loads(marker.read_text())["epoch"]))
    return sorted(epochs)


def load_loop_state(run_dir: Path, epoch: int) -> dict[str, Any]:
    return json.loads((checkpoint_dir(run_dir, epoch) / "loop_state.json").read_text())
