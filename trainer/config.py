"""The `trainer:` config section (each knob declared, defaulted and checked here, once), what a job
adds to it (the model and the schedule), the DeepSpeed ZeRO-3 config built from both, and the
learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names (no torch import: the CLI checks configs fast)
BACKENDS = ("auto", "gloo", "nccl")  # torch.distributed backends; auto: nccl on GPUs, gloo on CPUs


@dataclass
class TrainerConfig:
    """The ZeRO-3 data-parallel trainer. Bounds are checked on construction (OmegaConf 2.3 rejects
    `Literal` annotations, so choices are tuples checked here too)."""

    world_size: int = 1  # ZeRO-3 data-parallel ranks
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    batch_size: int = 8  # examples of each kind per rank and micro-step
    grad_accum: int = 1
    warmup_ratio: float = 0.0  # share of the run's optimizer steps spent warming the lr up from 0
    gradient_checkpointing: bool = False
    max_length: int = 512  # prompt + answer tokens; longer examples are truncated
    label_smoothing: float = 0.0
    backend: str = "auto"  # one of BACKENDS
    torch_threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        for name, low in (("world_size", 1), ("batch_size", 1), ("grad_accum", 1), ("max_length", 8),
                          ("weight_decay", 0), ("warmup_ratio", 0), ("label_smoothing", 0), ("torch_threads", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} is out of range; it must be >= {low}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} is out of range; it must be > 0")
        if self.warmup_ratio > 1 or self.label_smoothing >= 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1] and "
                             f"label_smoothing={self.label_smoothing} in [0, 1)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not allowed; choose one of: {', '.join(BACKENDS)}")

    def process_group_backend(self, on_gpus: bool) -> str:
        return self.backend if self.backend != "auto" else ("nccl" if on_gpus else "gloo")


@dataclass(frozen=True)
class TrainerJob:
    """What one job adds to the trainer section: the model to load and the schedule it trains on.
    Computed by the recipe (pmc_pipeline/recipes), not set by users."""

    model_path: str  # local HF folder or hub id
    dtype: str  # one of DTYPES (the config's model.dtype)
    seed: int
    micro_batch_size: int  # examples per rank and micro-step (unlearning: batch_size x example kinds)
    total_steps: int | None  # optimizer steps of the whole job: lr warm-up and linear decay; None: constant lr
    on_gpus: bool
    gguf_file: str | None = None  # a GGUF file inside model_path (dequantised on load)
    # roles whose loss is the KL from the starting model instead of the NLL (`retain_loss: kl`); non-empty:
    # the ranks hold a frozen copy of the starting model (trainer/reference.py)
    kl_roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def warmup_steps(self, config: TrainerConfig) -> int:
        return int(round(config.warmup_ratio * self.total_steps)) if self.total_steps else 0


def deepspeed_config(config: TrainerConfig, job: TrainerJob) -> dict[str, Any]:
    """ZeRO-3 config; no optimizer section: the torch AdamW passed in code compiles no op."""
    return {
        "train_micro_batch_size_per_gpu": job.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": job.micro_batch_size * config.grad_accum * config.world_size,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": job.dtype == "bfloat16"},
        "fp16": {"enabled": job.dtype == "float16"},
        # Persistence threshold 0: every parameter stays partitioned, so each rank holds 1/world size of
        # the weights, as `pmc check` estimates. DeepSpeed's default (1e5 elements) keeps small tensors
        # (norms, biases: < 0.1 % of the paper's models) whole on every rank after first use; the price
        # is one small all-gather per norm module and pass (a bias is gathered with its Linear's weight).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_factor(config: TrainerConfig, job: TrainerJob) -> Callable[[int], float]:
    """Linear warm-up, then constant, or linear decay to 0 at `job.total_steps` when it is set."""
    warmup, total = job.warmup_steps(config), job.total_steps

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if total is None:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor
