"""Typed configuration: YAML files composed by Hydra, merged onto the dataclass schemas, turned into
those dataclass objects.

`load_config("unlearn", "configs/unlearn/phi-1.5.yaml", ["pmc.epochs=5"])` composes the file (its
Hydra `defaults:` list included), merges it onto the schema (unknown keys and wrong types fail),
applies command-line `key=value` overrides, then builds the `UnlearnConfig` object, whose sections
check their own values (pmc_pipeline/schema.py, rollout/config.py, trainer/config.py). Every failure
is a `ConfigError` whose message names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pmc_pipeline.errors import ConfigError, first_line
from pmc_pipeline.schema import OPEN_SECTIONS, SCHEMAS

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


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


def _missing_keys(config: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"required config key(s) not set: {', '.join(missing)}")


def _to_object(node: DictConfig, path: str = "") -> Any:
    """The schema objects for a merged config, section by section, so that a section's own check (its
    `__post_init__`) fails with the full key: "trainer." + "batch_size=0 is out of range ..."."""
    values = {}
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            values[key] = _to_object(child, f"{path}{key}.")
        elif isinstance(child, (DictConfig, ListConfig)):
            values[key] = OmegaConf.to_container(child, resolve=True)
        else:
            values[key] = node[key]
    try:
        return OmegaConf.get_type(node)(**values)
    except ValueError as exc:
        raise ConfigError(f"{path}{exc}") from None


def load_config(kind: str, path_or_name: str | None, overrides: list[str] | None = None) -> Any:
    """Compose, merge, override and check a config of the given kind (a key of `SCHEMAS`): the
    command's schema object (e.g. `UnlearnConfig`) that the recipe and its roles take as it is."""
    if kind not in SCHEMAS:
        raise ConfigError(f"unknown config kind '{kind}'; choose one of: {', '.join(SCHEMAS)}")
    layers: list[tuple[str, DictConfig]] = []
    if path_or_name:
        path = resolve_config_path(path_or_name)
        layers.append((str(path), compose_yaml(path)))
    layers.append(("command line", _parse_overrides(list(overrides or []))))
    config = _merge_onto_schema(SCHEMAS[kind], *layers)
    _missing_keys(config)
    return _to_object(config)


def from_mapping(kind: str, values: dict[str, Any], overrides: list[str] | None = None) -> Any:
    """Build and check a config from a plain dict (used by the demo and tests), then `key=value` overrides."""
    layers = [("settings", OmegaConf.create(values))]
    if overrides:
        layers.append(("command line", _parse_overrides(list(overrides))))
    config = _merge_onto_schema(SCHEMAS[kind], *layers)
    _missing_keys(config)
    return _to_object(config)


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(config, resolve=True)


def to_dict(config: Any) -> dict[str, Any]:
    """A config object as plain nested dicts (what config.yaml holds)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def use_gpus(config: Any) -> bool:
    """Whether roles should ask Ray for GPUs: explicit setting, else whether CUDA is visible."""
    setting = config.resources.use_gpus
    if setting in ("true", "false"):
        return setting == "true"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA: the CPU path is the safe answer
        return False
