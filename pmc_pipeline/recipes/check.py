"""`pmc check <config>`: validate a config, print its placement and a per-GPU memory estimate.

Starts nothing (no Ray, no engine, no model load). The architecture comes from the model folder's
config.json when there is one here, else from a small table of known models (their published
config.json values), so the big configs can be checked on a laptop without a model hub.

Per-GPU memory, GiB (activations and CUDA/NCCL workspaces are not counted):
    trainer rank (ZeRO-3 over W ranks): weights P*b/W + gradients P*b/W + AdamW states S*P/W
        (S = 12 bytes in bf16/fp16: fp32 master copy + two moments; 8 in float32), + P*b/W for the frozen
        starting model with `retain_loss: kl`
    rollout engine (tensor parallel t): weights P*b/t + KV cache, where vLLM takes
        gpu_memory_utilization * GPU memory in all and the KV cache gets the rest
    colocated: both on one GPU (vLLM sleeping during training frees its KV cache, not the trainer's states)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from pmc_pipeline import config as config_module
from pmc_pipeline.errors import PMCError
from pmc_pipeline.runtime.placement import PlacementPlan, plan_from_config

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TWO_MATRIX_MLPS = {"phi", "gpt2", "gpt_neox"}  # fc1/fc2 instead of gate/up/down


@dataclass(frozen=True)
class Architecture:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    mlp_matrices: int = 3
    extra_params: float = 0.0  # parts outside the decoder (e.g. a vision tower)
    source: str = ""

    @property
    def params(self) -> float:
        """Weight count from the shapes (norms and biases left out: <0.1%)."""
        h = self.hidden_size
        attention = 2 * h * self.num_heads * self.head_dim + 2 * h * self.num_kv_heads * self.head_dim
        mlp = self.mlp_matrices * h * self.intermediate_size
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return self.num_layers * (attention + mlp) + embeddings + self.extra_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


# Values from each model's published config.json on the Hugging Face hub (read offline here).
KNOWN_ARCHITECTURES: dict[tuple[str, ...], Architecture] = {
    ("gemma-3-12b",): Architecture(
        262208, 3840, 15360, 48, 16, 8, 256, True, extra_params=0.42e9,
        source="known-architecture table: google/gemma-3-12b-it config.json (text model) + its ~0.42 B-parameter "
               "SigLIP vision tower"),
    ("llama-3.2-3b",): Architecture(
        128256, 3072, 8192, 28, 24, 8, 128, True,
        source="known-architecture table: meta-llama/Llama-3.2-3B-Instruct config.json"),
    ("phi-1_5", "phi-1.5"): Architecture(
        51200, 2048, 8192, 24, 32, 32, 64, False, mlp_matrices=2,
        source="known-architecture table: microsoft/phi-1_5 config.json"),
}


def architecture_from_config_json(path: Path) -> Architecture:
    raw = json.loads(path.read_text())
    text = raw.get("text_config", raw)  # multimodal checkpoints keep the language model's shape here
    heads = text["num_attention_heads"]
    return Architecture(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"], num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        tied_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        mlp_matrices=2 if text.get("model_type", raw.get("model_type")) in TWO_MATRIX_MLPS else 3,
        source=f"{path}",
    )


def find_architecture(model_path: str) -> Architecture | None:
    """From `model_path`/config.json when it exists here, else the known table by name, else None."""
    config_json = Path(model_path).expanduser() / "config.json"
    if config_json.is_file():
        return architecture_from_config_json(config_json)
    name = model_path.lower()
    for aliases, architecture in KNOWN_ARCHITECTURES.items():
        if any(alias in name for alias in aliases):
            return architecture
    return None


@dataclass(frozen=True)
class GPUEstimate:
    role: str
    parts: dict[str, float]  # GiB by part

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate(arch: Architecture, plan: PlacementPlan, cfg: Any) -> list[GPUEstimate]:
    """Per-GPU memory of each kind of GPU in the plan."""
    b = DTYPE_BYTES[cfg.model.dtype]
    p, ranks = arch.params, plan.trainer_ranks
    optimizer_bytes = 8 if cfg.model.dtype == "float32" else 12
    trainer = {"weights (ZeRO-3 shard)": p * b / ranks / GIB, "gradients (shard)": p * b / ranks / GIB,
               "AdamW states (shard)": p * optimizer_bytes / ranks / GIB}
    if getattr(cfg, "retain_loss", "nll") == "kl":  # the KL retain term holds the frozen starting model
        trainer["starting model for the KL (shard)"] = p * b / ranks / GIB
    if not plan.engines:
        return [GPUEstimate(f"trainer rank (x{ranks})", trainer)]
    tp = plan.tensor_parallel_size
    engine_weights = p * b / tp / GIB
    vllm_total = cfg.rollout.gpu_memory_utilization * cfg.resources.gpu_memory_gib
    engine = {"vLLM weights": engine_weights, "vLLM KV cache": vllm_total - engine_weights}
    if plan.colocate:
        return [GPUEstimate(f"shared GPU: trainer rank + rollout engine (x{ranks})", {**trainer, **engine})]
    return [GPUEstimate(f"rollout engine GPU (x{plan.engines * tp})", engine),
            GPUEstimate(f"trainer rank GPU (x{ranks})", trainer)]


def weight_push_lines(plan: PlacementPlan, bucket_mb: int) -> list[str]:
    """The weight-transfer group: its backend, size and who holds which rank."""
    from rollout.transfer import group_ranks, transfer_backend

    ranks = group_ranks(plan.engines, plan.tensor_parallel_size)
    lines = [f"weight push: vLLM weight transfer, backend {transfer_backend(plan.use_gpus, plan.colocate)}, "
             f"group of {1 + sum(len(r) for r in ranks)}; whole layers gathered up to {bucket_mb} MiB",
             "  rank 0: trainer rank 0 (sends; the other trainer ranks only join the ZeRO-3 gathers)"]
    lines += [f"  ranks {r[0]}-{r[-1]}: rollout engine {e} (tensor-parallel workers)" if len(r) > 1
              else f"  rank {r[0]}: rollout engine {e}" for e, r in enumerate(ranks)]
    return lines


def config_kind(path_or_name: str) -> str:
    """'finetune' when the file sets output_dir, else 'unlearn'."""
    composed = config_module.compose_yaml(config_module.resolve_config_path(path_or_name))
    return "finetune" if "output_dir" in composed else "unlearn"


# what rollout.model_impl means on the engines' machines (decided there: their install may differ from this one)
MODEL_IMPL_LINES = {
    "auto": "auto: vLLM's own module for the architecture where it loads on the engine's machine, else vLLM's "
            "Transformers backend",
    "vllm": "vllm: vLLM's own module for the architecture",
    "transformers": "transformers: vLLM's Transformers backend (transformers' model class)",
}


def check_config(path_or_name: str, overrides: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The report's lines and the problems found (an estimate over a GPU's memory); raises ConfigError
    when the config itself is invalid."""
    kind = config_kind(path_or_name)
    cfg = config_module.load_config(kind, path_or_name, overrides)
    use_gpus = cfg.resources.use_gpus != "false"  # plan for the cluster, not this machine
    plan = plan_from_config(cfg, use_gpus, with_rollout=kind == "unlearn" and cfg.needs_rollout)
    lines = [f"config: {config_module.resolve_config_path(path_or_name)} ({kind}), valid",
             f"model: {cfg.model.path} ({cfg.model.dtype})", *plan.describe()]
    if kind == "unlearn" and plan.engines:
        lines += weight_push_lines(plan, cfg.rollout.weight_bucket_mb)
        lines.append(f"engine model implementation: {MODEL_IMPL_LINES[cfg.rollout.model_impl]} "
                     "(each run's roles.json records what every engine ran)")
    arch = find_architecture(cfg.model.path)
    if arch is None:
        known = ", ".join(a[0] for a in KNOWN_ARCHITECTURES)
        return lines + [f"memory: no estimate (no config.json at {cfg.model.path} and not a known architecture: "
                        f"{known})"], []
    lines.append(f"memory per GPU (GiB, estimate; {arch.params / 1e9:.2f} B parameters from {arch.source}; "
                 "activations not counted):")
    problems = []
    for gpu in estimate(arch, plan, cfg):
        parts = ", ".join(f"{name} {gib:.1f}" for name, gib in gpu.parts.items())
        fits = gpu.total <= cfg.resources.gpu_memory_gib
        lines.append(f"  {gpu.role}: {gpu.total:.1f} of {cfg.resources.gpu_memory_gib:g} = {parts}"
                     + ("" if fits else "  <- does not fit"))
        if not fits:
            problems.append(f"{gpu.role} needs ~{gpu.total:.1f} GiB > resources.gpu_memory_gib="
                            f"{cfg.resources.gpu_memory_gib:g}")
        kv = gpu.parts.get("vLLM KV cache")
        if kv is not None:
            per_token = arch.kv_bytes_per_token(DTYPE_BYTES[cfg.model.dtype]) / plan.tensor_parallel_size
            tokens = max(0.0, kv) * GIB / per_token
            lines.append(f"    KV cache holds ~{tokens:,.0f} tokens = {tokens / cfg.rollout.max_model_len:,.0f} "
                         f"sequences of rollout.max_model_len={cfg.rollout.max_model_len}")
            if kv <= 0:
                problems.append(f"rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization} leaves no "
                                "KV cache after the weights")
    if kind == "unlearn":
        lines += reference_lines(arch, plan, cfg)
    return lines, problems if plan.use_gpus else []


def reference_lines(arch: Architecture, plan: PlacementPlan, cfg: Any) -> list[str]:
    """What computing a baseline's reference log-probs once saves against holding a frozen second model."""
    from pmc_pipeline.method.baselines import resolve_baseline

    if cfg.method == "pmc" or not resolve_baseline(cfg.method).needs_reference or cfg.retain_loss == "kl":
        return []  # nothing held for the sums, or a copy held anyway for the KL retain term (in the estimate)
    copy = arch.params * DTYPE_BYTES[cfg.model.dtype] / plan.trainer_ranks / GIB
    return [f"  reference model ({cfg.method}): the starting model's answer log-probs are computed once before epoch 1 "
            f"(8 bytes per forget row) instead of a frozen copy held beside the trainer (OpenUnlearning's way): "
            f"{copy:.1f} GiB less per trainer rank (the copy's ZeRO-3 shard) and one forward pass less per step"]


def print_check(path_or_name: str, overrides: list[str] | None = None) -> None:
    """Print the report; a config that cannot fit fails (exit 2) after it."""
    lines, problems = check_config(path_or_name, overrides)
    print("\n".join(lines), flush=True)
    if problems:
        raise PMCError("; ".join(problems) + " (more trainer ranks, tensor parallelism or GPUs would help)")
