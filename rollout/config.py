"""The `rollout:` (engine) and `sampling:` config sections: each knob declared, defaulted and checked
here, once."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class RolloutConfig:
    """One vLLM engine (`resources.rollout_engines` of them run side by side)."""

    max_model_len: int = 1024
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gib: float = 1.0  # vLLM-CPU's KV cache (VLLM_CPU_KVCACHE_SPACE); a whole number of GiB
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    # tokens per KV-cache block, the granularity of prefix-cache hits; auto: 32 on CPU (vLLM-CPU's
    # smallest; its default 128 is longer than most TOFU prompts, so no likelihood-scoring prompt would
    # share its question's blocks), vLLM's own default elsewhere
    block_size: int | str = "auto"
    # torch threads of an engine on CPU: Ray starts every actor with OMP_NUM_THREADS=1, which alone would
    # leave a vLLM-CPU engine on one core (half the speed on 2 cores, same numbers); auto: the cores this
    # process may use, shared among the engines. Ignored on GPUs.
    cpu_threads: int | str = "auto"
    # vLLM's in-tree module or its Transformers backend; auto: the in-tree one wherever it loads in this
    # install (rollout/model_impl.py)
    model_impl: str = "auto"
    # the weight push (vLLM's weight-transfer protocol, rollout/transfer.py): the trainer gathers whole
    # layers from its ZeRO-3 shards up to this many MiB at a time; a silent peer fails it after the timeout
    weight_bucket_mb: int = 256
    weight_push_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for name, low in (("max_model_len", 16), ("tensor_parallel_size", 1), ("cpu_kv_cache_gib", 1),
                          ("weight_bucket_mb", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} is out of range; it must be >= {low}")
        if self.cpu_kv_cache_gib != int(self.cpu_kv_cache_gib):
            raise ValueError(f"cpu_kv_cache_gib={self.cpu_kv_cache_gib}: vLLM takes a whole number of GiB")
        if self.weight_push_timeout_s <= 0:
            raise ValueError(f"weight_push_timeout_s={self.weight_push_timeout_s} is out of range; it must be > 0")
        from rollout.model_impl import MODEL_IMPLS

        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl={self.model_impl!r} is not allowed; choose one of: {', '.join(MODEL_IMPLS)}")
        for name in ("block_size", "cpu_threads"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} is not allowed; give a positive whole number or auto")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} is out of range; "
                             "it must be in (0, 1]")

    def engine_cpu_threads(self, engines: int) -> int:
        """cpu_threads resolved for one of `engines` engines on this machine."""
        if self.cpu_threads != "auto":
            return int(self.cpu_threads)
        return max(1, len(os.sched_getaffinity(0)) // max(1, engines))

    @property
    def kv_cache_env(self) -> str:
        """VLLM_CPU_KVCACHE_SPACE's value: an integer string ("1.0" stops the engine at start)."""
        return str(int(self.cpu_kv_cache_gib))


@dataclass
class SamplingConfig:
    """How the PMC loop samples each epoch's candidate answers."""

    num_samples: int = 5
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 200

    def __post_init__(self) -> None:
        for name, low in (("num_samples", 1), ("max_tokens", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} is out of range; it must be >= {low}")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} is out of range; it must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is out of range; it must be in (0, 1]")
