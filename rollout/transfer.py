"""Which weight-transfer backend a placement uses, and the trainer-side init info for each rank.

One push path for every placement (vLLM's weight-transfer protocol); only the transport differs:

    engines on CPUs                   gloo   (ours: rollout/gloo_transfer.py; what CI runs)
    engines on GPUs of their own      nccl   (vLLM's; trainer rank 0 broadcasts to every engine worker)
    engines sharing the trainer's GPU ipc    (vLLM's; CUDA IPC handles), with sleep mode while training

The group holds trainer rank 0 at rank 0 and engine i's workers at 1 + i * workers_per_engine + w.
"""

from __future__ import annotations

from typing import Any

BACKENDS = ("gloo", "nccl", "ipc")


def transfer_backend(on_gpus: bool, colocated: bool) -> str:
    if not on_gpus:
        return "gloo"
    return "ipc" if colocated else "nccl"


def group_ranks(engines: int, workers_per_engine: int) -> list[list[int]]:
    """The transfer group's ranks of each engine's workers (trainer rank 0 is rank 0)."""
    return [[1 + engine * workers_per_engine + worker for worker in range(workers_per_engine)]
            for engine in range(engines)]


def trainer_init_info(backend: str, rank: int, address: str, port: int, world_size: int, timeout_s: float) -> Any:
    """vLLM's `TrainerInitInfo` for trainer rank `rank` (rank 0 sends; the others only join the gathers)."""
    if backend == "gloo":
        from rollout.gloo_transfer import GlooTrainerInitInfo

        return GlooTrainerInitInfo(address, port, world_size, timeout_s=timeout_s, rank=rank)
    if backend == "nccl":  # never run here (no GPU): the protocol calls are the gloo path's
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(address, port, world_size, rank=rank)
    if backend == "ipc":  # never run here (no GPU)
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=rank)
    raise ValueError(f"unknown weight-transfer backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
