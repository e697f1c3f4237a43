"""Read back what a run sent to its trackers, from each tracker's own files (tests only).

Each reader returns {metric name: {step: value}} and the run's config as the tracker stored it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def tensorboard_values(log_dir: Path) -> tuple[dict[str, dict[int, float]], str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    config = "".join(e.tensor_proto.string_val[0].decode() for e in events.Tensors("config/text_summary"))
    return scalars, config


def mlflow_values(uri: str, experiment: str) -> tuple[dict[str, dict[int, float]], dict[str, str], dict[str, str]]:
    """Metrics, params and tags of the experiment's only run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    metrics = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in run.data.metrics}
    return metrics, run.data.params, run.data.tags


WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records


def wandb_values(wandb_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, Any], dict[str, Any]]:
    """History (by _step), config and final summary of the only offline run under wandb_dir."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(wandb_dir).glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    position, pending, records = 7, b"", []  # 7-byte file header: ":W&B", magic, version
    while position + 7 <= len(data):
        room = WANDB_BLOCK - position % WANDB_BLOCK
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):  # block padding
            position += room
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    history: dict[str, dict[int, float]] = {}
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[row["_step"]] = value
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return history, config, summary
