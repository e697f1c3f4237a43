"""Where a model comes from (local folder or hub id) and what its tokenizer is; checked up front."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pmc_pipeline.errors import ConfigError

# config.json keys that change nothing about the weights' layout or the engine's stop tokens
_NON_ARCHITECTURE_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def resolve_model_source(path: str, gguf_file: str | None = None) -> str:
    """A local folder (made absolute) or a hub id; a local-looking path that does not exist fails."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(f"model.path must be a model folder or hub id, got a file: {local}")
        if gguf_file:
            if not (local / gguf_file).is_file():
                raise ConfigError(f"model.gguf_file '{gguf_file}' not found in {local}")
        elif not (local / "config.json").is_file():
            raise ConfigError(f"model.path {local} has no config.json (not a Hugging Face model folder)")
        return str(local.resolve())
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    if looks_local:
        raise ConfigError(f"model.path not found: {path}")
    return path  # a hub id such as "org/name"


def load_tokenizer(source: str, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file) if gguf_file else \
            AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # offline hub ids, broken folders
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.path '{source}': cannot load its tokenizer: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def architecture_signature(source: str) -> str:
    """Equal for checkpoints whose weights can be swapped into one running engine."""
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return f"hub:{source}"
    config = json.loads(config_file.read_text())
    kept = {k: v for k, v in config.items() if k not in _NON_ARCHITECTURE_KEYS}
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()
