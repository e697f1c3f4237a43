"""Where a model comes from (local folder or hub id) and what its tokenizer is; checked up front.

`validate_model_folder` checks a local folder before any engine starts or anything is written:
config.json, an architecture the runtimes can load, each safetensors file whole (header readable,
size matching it), each shard an index names present. Hub ids are left to the hub loader; a GGUF
file carries its own config and weights and is not checked here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Set
from pathlib import Path
from typing import Any

from pmc_pipeline.errors import ConfigError, first_line

# config.json keys that change nothing about the weights' layout or the engine's stop tokens
_NON_ARCHITECTURE_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit: a larger length field is garbage


def _is_hub_id(path: str) -> bool:
    """A hub id ("org/name") that is not a local path."""
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    return not looks_local and not Path(path).expanduser().exists()


def resolve_model_source(path: str, gguf_file: str | None = None) -> str:
    """A local folder (made absolute) or a hub id; a local-looking path that does not exist fails."""
    if _is_hub_id(path):
        return path
    local = Path(path).expanduser()
    if not local.exists():
        raise ConfigError(f"model.path not found: {path}")
    if not local.is_dir():
        raise ConfigError(f"model.path must be a model folder or hub id, got a file: {local}")
    if gguf_file and not (local / gguf_file).is_file():
        raise ConfigError(f"model.gguf_file '{gguf_file}' not found in {local}")
    return str(local.resolve())


def validate_model_folder(source: str, vllm: bool = True, trainer: bool = True, setting: str = "model.path",
                          model_impl: str = "auto") -> None:
    """Check a local model folder for the runtimes that will load it; a hub id passes unchecked.

    vllm: the rollout engine loads it (config.json `architectures` must name a model in vLLM's registry,
    whose module loads in this install, or with `model_impl` auto / transformers, that vLLM's Transformers
    backend runs instead: rollout/model_impl.py). trainer: transformers' AutoModelForCausalLM loads it
    (config.json `model_type` must be a causal LM transformers knows)."""
    if _is_hub_id(source):
        return
    folder = Path(source).expanduser()
    where = f"{setting} {folder}"
    if not folder.is_dir():
        raise ConfigError(f"{where}: not a model folder")
    config = _read_config(folder, where)
    if vllm:
        _check_vllm_architecture(config, where, model_impl)
    if trainer:
        _check_causal_lm(config, where)
    for index in sorted(folder.glob("*.index.json")):
        _check_shard_index(index, where)
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(weights, where)


def _read_json(file: Path, where: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise ConfigError(f"{where}: {file.name} is not valid JSON ({first_line(exc)})") from None


def _read_config(folder: Path, where: str) -> dict[str, Any]:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{where}: no config.json (not a Hugging Face model folder)")
    config = _read_json(folder / "config.json", where)
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json is not a JSON object")
    return config


def _vllm_architectures() -> tuple[Set[str], str]:
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # vLLM logs platform notes as it imports: noise before a one-line error
    try:
        import vllm
        from vllm.model_executor.models import ModelRegistry
    finally:
        logging.disable(previous)
    return ModelRegistry.get_supported_archs(), vllm.__version__


def _check_vllm_architecture(config: dict[str, Any], where: str, model_impl: str) -> None:
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and architectures and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"{where}: config.json has no 'architectures' list (vLLM picks the model class from it, "
                          "e.g. [\"LlamaForCausalLM\"])")
    supported, version = _vllm_architectures()
    if not any(a in supported for a in architectures):
        raise ConfigError(f"{where}: config.json architectures {', '.join(architectures)}: not a model vLLM "
                          f"{version} supports (the rollout engine needs one)")
    _check_vllm_model_imports(next(a for a in architectures if a in supported), where, version, model_impl)


def _check_vllm_model_imports(architecture: str, where: str, version: str, model_impl: str) -> None:
    """The engine imports the model's vLLM module at start; a missing optional dependency (e.g.
    Gemma-3's multimodal module needs torchvision, absent from the CPU install) would otherwise
    fail only after the run dir is made, in a 70-line pydantic error. `auto` then takes vLLM's
    Transformers backend (rollout/model_impl.py), whose module must load instead."""
    from rollout.model_impl import in_tree_failure

    failure = in_tree_failure(architecture)
    if failure is None or model_impl == "transformers":
        return
    if model_impl == "vllm":
        raise ConfigError(f"{where}: vLLM {version} cannot load its own {architecture} module in this install "
                          f"({failure}); rollout.model_impl=auto or transformers runs it through vLLM's "
                          "Transformers backend")
    backend_failure = in_tree_failure("TransformersMultiModalForCausalLM")
    if backend_failure is not None:
        raise ConfigError(f"{where}: vLLM {version} can load neither its own {architecture} module ({failure}) "
                          f"nor its Transformers backend ({backend_failure}) in this install; the rollout "
                          "engine needs one")


# config.json keys that bound a model's positions, as vLLM 0.32 derives its longest context from them
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                  "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE types whose max_position_embeddings already holds the extended length (vLLM applies no factor)
_ROPE_KEEPS_LIMIT = ("default", "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def model_position_limit(source: str) -> tuple[int, str] | None:
    """The longest context vLLM will accept for a local model folder, and where that comes from: the
    smallest position key of config.json (a multimodal config's text_config), `model_max_length` taking
    precedence, stretched by a linear/dynamic RoPE factor (not for Gemma-3, whose limit is scaled already),
    capped by tokenizer_config.json's model_max_length. None for a hub id or a config naming no limit."""
    if _is_hub_id(source):
        return None
    folder = Path(source).expanduser()
    config = _read_config(folder, f"model.path {folder}")
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    prefix = "text_config." if text is not config else ""
    found = [(text[key], key) for key in _POSITION_KEYS if isinstance(text.get(key), int)]
    if isinstance(text.get("model_max_length"), int):
        found = [(text["model_max_length"], "model_max_length")]
    if not found:
        return None
    limit, key = min(found)
    where = f"{prefix}{key} in {folder / 'config.json'}"
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in _ROPE_KEEPS_LIMIT and "gemma3" not in str(config.get("model_type")):
        limit = int(limit * float(rope.get("factor") or 1.0))
        where += f" x rope factor {rope.get('factor')}"
    tokenizer_file = folder / "tokenizer_config.json"
    tokenizer_limit = (_read_json(tokenizer_file, f"model.path {folder}").get("model_max_length")
                       if tokenizer_file.is_file() else None)
    if isinstance(tokenizer_limit, (int, float)) and tokenizer_limit < limit:
        limit, where = int(tokenizer_limit), f"model_max_length in {tokenizer_file}"
    return limit, where


def check_context_length(max_model_len: int, limit: tuple[int, str] | None,
                         setting: str = "rollout.max_model_len") -> None:
    """An engine's context above the model's positions fails in vLLM only once each engine starts (and
    in a sweep, in every trial): say so up front, in one line. `limit`: (positions, where that is said)."""
    if limit and max_model_len > limit[0]:
        raise ConfigError(f"{setting}={max_model_len} is above the model's position limit {limit[0]} ({limit[1]}); "
                          f"set {setting} <= {limit[0]}")


def _check_causal_lm(config: dict[str, Any], where: str) -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}: config.json model_type {model_type!r}: not a causal language model "
                          f"transformers {transformers.__version__} can load (the trainer needs one)")


def _check_shard_index(index: Path, where: str) -> None:
    content = _read_json(index, where)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise ConfigError(f"{where}: {index.name} has no 'weight_map' object")
    missing = sorted({str(f) for f in weight_map.values() if not (index.parent / str(f)).is_file()})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ConfigError(f"{where}: {index.name} names {len(missing)} missing shard(s): {shown}")


def _tensors_end(header: Any) -> int | None:
    """Where the last tensor's data ends (bytes after the header), or None for a malformed header."""
    if not isinstance(header, dict):
        return None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return None
        end = max(end, offsets[1])
    return end


def _check_safetensors(file: Path, where: str) -> None:
    """Layout: an 8-byte little-endian header length, the JSON header, then the tensors' bytes."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        length_field = handle.read(8)
        header_length = int.from_bytes(length_field, "little")
        if len(length_field) < 8 or header_length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise ConfigError(f"{where}: {file.name} is truncated or its header is corrupted "
                              f"(header length field {header_length:,} bytes, file has {size:,})")
        raw = handle.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{where}: {file.name} has a corrupted header (not JSON: {first_line(exc)})") from None
    end = _tensors_end(header)
    if end is None:
        raise ConfigError(f"{where}: {file.name} has a corrupted header (not a map of tensors with data_offsets)")
    data = size - 8 - header_length
    if data != end:
        state = "is truncated" if data < end else "is longer than its header says"
        raise ConfigError(f"{where}: {file.name} {state} (header says {end:,} bytes of tensors, file has {data:,})")


def load_tokenizer(source: str, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file) if gguf_file else \
            AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # offline hub ids, broken folders
        raise ConfigError(f"model.path '{source}': cannot load its tokenizer: {first_line(exc)}") from None
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
