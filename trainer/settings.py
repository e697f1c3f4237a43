"""What one trainer rank is told: its settings, the DeepSpeed ZeRO-3 config built from them, and the
learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainerSettings:
    model_path: str  # local HF folder or hub id
    gguf_file: str | None = None  # a GGUF file inside model_path (dequantised on load)
    dtype: str = "float32"
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    micro_batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    total_steps: int | None = None  # set: linear decay to 0 after warmup; None: constant
    gradient_checkpointing: bool = False
    label_smoothing: float = 0.0
    seed: int = 0
    backend: str = "gloo"
    torch_threads: int = 0  # 0: leave torch's default


def deepspeed_config(settings: TrainerSettings, world_size: int) -> dict[str, Any]:
    """ZeRO-3 config; no optimizer section: the torch AdamW passed in code compiles no op."""
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {settings.dtype!r}")
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "train_batch_size": settings.micro_batch_size * settings.grad_accum * world_size,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": settings.dtype == "bfloat16"},
        "fp16": {"enabled": settings.dtype == "float16"},
        # Persistence threshold 0: every parameter stays partitioned, so each rank holds 1/world size of
        # the weights, as `pmc check` estimates. DeepSpeed's default (1e5 elements) keeps small tensors
        # (norms, biases: < 0.1 % of the paper's models) whole on every rank after first use; the price
        # is one small all-gather per norm module and pass (a bias is gathered with its Linear's weight).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_factor(settings: TrainerSettings) -> Callable[[int], float]:
    """Linear warm-up, then constant, or linear decay to 0 at `total_steps` when it is set."""
    warmup, total = settings.warmup_steps, settings.total_steps

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if total is None:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor
