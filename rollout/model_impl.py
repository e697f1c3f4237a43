"""Which model implementation a vLLM engine runs: vLLM's in-tree module for the architecture, or vLLM's
Transformers modeling backend (`model_impl="transformers"`), which runs transformers' own model class.

`rollout.model_impl: auto` keeps vLLM's own choice wherever the in-tree module loads, and takes the
Transformers backend where it cannot be imported in this install: on the CPU install, vLLM's Gemma-3
multimodal module imports an image processor that needs torchvision, which has no CPU build for this
torch (docs/platform.md); on GPUs the in-tree module loads and is kept. Detected by importing the
module, not from a list of models. Also here: what else a local model folder tells the engine (its
architecture, its end-of-turn ids).
"""

from __future__ import annotations

MODEL_IMPLS = ("auto", "vllm", "transformers")


def in_tree_failure(architecture: str) -> str | None:
    """Why vLLM's in-tree module for `architecture` cannot be imported here; None when it can (or vLLM
    registers no module of its own for it)."""
    from vllm.model_executor.models import ModelRegistry

    model = getattr(ModelRegistry, "models", {}).get(architecture)
    load = getattr(model, "load_model_cls", None)
    if load is None:  # unknown here, or registry internals moved: vLLM decides at start
        return None
    try:
        load()
    except ImportError as exc:
        while exc.__cause__ is not None and isinstance(exc.__cause__, ImportError):
            exc = exc.__cause__
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def resolve_model_impl(requested: str, architecture: str) -> str:
    """What to hand vLLM for `requested` (one of MODEL_IMPLS, checked by RolloutConfig): auto becomes
    "transformers" where the in-tree module cannot load here, and stays vLLM's "auto" elsewhere."""
    if requested == "auto" and in_tree_failure(architecture) is not None:
        return "transformers"
    return requested


def model_architecture(model_path: str) -> str:
    """The first `architectures` entry of a local model folder's config.json ("" for a hub id)."""
    import json
    from pathlib import Path

    config = Path(model_path) / "config.json"
    if not config.is_file():
        return ""
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or [""]
    return architectures[0]


def model_stop_token_ids(model_path: str) -> tuple[int, ...]:
    """The end-of-sequence ids in a local checkpoint's generation_config.json (empty if none).

    The engine runs with generation_config="vllm" (no hidden sampling defaults), so by itself it stops
    on the tokenizer's eos only. Chat models end a turn on other ids too: Gemma-3-it's tokenizer eos is
    <eos> but its answers end with <end_of_turn> (generation_config: [<eos>, <end_of_turn>]); HF
    generate stops on all of them, and so must the rollouts, or every answer runs to max_tokens."""
    import json
    from pathlib import Path

    file = Path(model_path) / "generation_config.json"
    if not file.is_file():
        return ()
    try:
        eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
