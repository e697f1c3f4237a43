"""Typed configuration: YAML files composed by Hydra, checked against dataclass schemas.

`load_config("unlearn", "configs/unlearn/phi-1.5.yaml", ["pmc.epochs=5"])` composes the file (its
Hydra `defaults:` list included), merges it onto the schema (unknown keys and wrong types fail),
applies command-line `key=value` overrides, then checks the allowed values. Every failure is a
`ConfigError` whose message names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pmc_pipeline.errors import ConfigError, first_line
from pmc_pipeline.schema import OPEN_SECTIONS, SCHEMAS

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


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
