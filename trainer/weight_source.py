"""The ZeRO-3 model as a weight source for vLLM's weight-transfer protocol (streamed, never whole), and
the peak-memory probe a push reports.

Under ZeRO-3 a parameter holds only this rank's shard (its `shape` is [0]; `ds_shape` is the real
one), so vLLM's own `ModuleSource` cannot read it. `Zero3Source` declares every parameter from its
`ds_shape` under its Hugging Face name, and yields them gathered one group at a time: a decoder
layer, or several consecutive ones up to a byte budget, whole layers only (the engine reloads layer
by layer, and a layer that gets only part of its tensors is processed incomplete). Each tensor is a
copy made inside the gather: once the gather ends ZeRO-3 re-partitions the parameter, and the
sender may still hold the tensor then. Rank 0 thus holds at most one group beyond its own shard.

Every rank must iterate in step: each gather is a collective. Only rank 0 keeps copies; the others
yield `None` for each tensor.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import deepspeed
import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource, layerwise_groups


class Zero3Source(WeightSource):
    def __init__(self, module: torch.nn.Module, bucket_bytes: int, keep_copies: bool) -> None:
        """`module`: the ZeRO-3-partitioned model; `bucket_bytes`: consecutive layers are gathered together
        up to this size; `keep_copies`: rank 0.

        A tied parameter is sent under each of its names (e.g. lm_head.weight and the input embedding),
        as a checkpoint may hold them: vLLM unties a model whose checkpoint ships its own lm_head and
        then expects it in every push; a tied engine skips the alias."""
        self.params = dict(module.named_parameters(remove_duplicate=False))
        self.keep_copies = keep_copies
        shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.params.items()}
        sizes = {name: p.dtype.itemsize * _numel(shapes[name]) for name, p in self.params.items()}
        self._groups = bucketed(layerwise_groups(list(self.params)), sizes, bucket_bytes)
        # metadata in group order: the protocol wants iteration and metadata in one order
        self._meta = [ParamMeta(name, self.params[name].dtype, shapes[name])
                      for group in self._groups for name in group]
        self.total_bytes = sum(sizes.values())

    def metadata(self) -> list[ParamMeta]:
        return list(self._meta)

    def groups(self) -> list[list[str]]:
        return [list(group) for group in self._groups]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for group in self._groups:
            unique = list({id(self.params[name]): self.params[name] for name in group}.values())
            with deepspeed.zero.GatheredParameters(unique, modifier_rank=None):
                # on the parameter's device: nccl sends from the GPU
                copies = {id(p): p.detach().clone() if self.keep_copies else None for p in unique}
            yield from ((name, copies[id(self.params[name])]) for name in group)


def bucketed(groups: list[list[str]], sizes: dict[str, int], bucket_bytes: int) -> list[list[str]]:
    """Consecutive whole groups merged while their total stays within `bucket_bytes` (a group larger
    than the bucket stays one group: layers are never split)."""
    merged: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for group in groups:
        size = sum(sizes[name] for name in group)
        if current and current_bytes + size > bucket_bytes:
            merged.append(current)
            current, current_bytes = [], 0
        current = current + group
        current_bytes += size
    if current:
        merged.append(current)
    return merged


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class _Growth:
    bytes = 0


@contextlib.contextmanager
def peak_rss_growth(interval_s: float = 0.002) -> Iterator[_Growth]:
    """The largest growth of this process's resident memory while the block runs (sampled)."""
    import psutil

    process, growth, done = psutil.Process(), _Growth(), threading.Event()
    base = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            growth.bytes = max(growth.bytes, process.memory_info().rss - base)
            done.wait(interval_s)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        yield growth
    finally:
        done.set()
        watcher.join()
        growth.bytes = max(growth.bytes, process.memory_info().rss - base)
