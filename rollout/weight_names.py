"""The names and shapes a running engine's model takes, checked before any weight is loaded into it:
by a checkpoint folder loaded through the worker extension (rollout/weight_sync.py) and by a weight
push (rollout/gloo_transfer.py). Runs inside vLLM's worker."""

from __future__ import annotations

from typing import Mapping

import torch

Shapes = Mapping[str, tuple[int, ...]]


class WeightMismatchError(ValueError):
    """The new weights do not fit the running model; nothing was loaded, the engine is intact."""


def check_shapes(got: Shapes, expected: Shapes, optional: frozenset[str] = frozenset()) -> None:
    """Raise WeightMismatchError unless `got` has exactly the expected names and shapes.

    vLLM's loader only warns about missing tensors and can fail half-way on a wrong shape, so the
    check runs before anything is copied into the model.
    """
    missing = sorted(set(expected) - set(got) - optional)
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{n}: {got[n]} != {expected[n]}" for n in sorted(set(got) & set(expected)) if got[n] != expected[n]]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise WeightMismatchError("weights do not match the running model: " + "; ".join(parts))


def meta_model(hf_config) -> torch.nn.Module:
    """transformers' model for `hf_config` on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def transformers_shapes(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """Names/shapes of a transformers model's `state_dict()`, and the names that may be left out.

    Tied aliases (e.g. lm_head.weight when embeddings are tied) are in `state_dict()` but not in
    checkpoints, so either form is accepted.
    """
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    parameters = {name for name, _ in model.named_parameters()}
    optional = set(shapes) - parameters
    # The output embedding of a tied model, by the config: inside vLLM's worker the meta model was seen
    # untied (lm_head a parameter of its own), and a trainer sends each tied tensor once.
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        optional |= {name for name, p in model.named_parameters(remove_duplicate=False) if p is head.weight}
    return shapes, frozenset(optional)


def current_config(vllm_config):
    """Models vLLM runs on its Transformers backend (e.g. Phi, Gemma-3 here) have their transformers
    classes wrapped by vLLM's compile decorator in this process: building one, even on the meta device,
    needs vLLM's current config set, as it is while vLLM builds the model."""
    from vllm.config import set_current_vllm_config

    return set_current_vllm_config(vllm_config)


_REFERENCE: dict[int, tuple[torch.nn.Module, dict[str, tuple[int, ...]], frozenset[str]]] = {}


def _reference(vllm_config) -> tuple[torch.nn.Module, dict[str, tuple[int, ...]], frozenset[str]]:
    """The meta model a vLLM config runs, with its `transformers_shapes` (built once per engine)."""
    key = id(vllm_config)
    if key not in _REFERENCE:
        with current_config(vllm_config):
            model = meta_model(vllm_config.model_config.hf_config)
        _REFERENCE[key] = (model, *transformers_shapes(model))
    return _REFERENCE[key]


def expected_shapes(vllm_config) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """`transformers_shapes` of the model a vLLM config runs."""
    _, shapes, optional = _reference(vllm_config)
    return shapes, optional


def runtime_names(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Each checkpoint name as transformers' `from_pretrained` renames it for `model`: a checkpoint folder
    may hold another layout than the runtime names (Gemma-3's hub layout, `language_model.model.*`,
    which `save_pretrained` writes), and vLLM's loader maps it itself."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = model.state_dict()
    return {name: rename_source_key(name, renamings, converters, model.base_model_prefix, state)[0] for name in names}


def tie_output_embedding(vllm_config, model_dir: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A folder whose own config ties the word embeddings, saved without its output embedding (as
    `save_pretrained` of a tied model may), gets that tensor as an alias of the input embedding: vLLM
    builds an engine's head untied when the checkpoint it *started* on shipped one, and that head must
    then be given the embedding, as tying means. A folder that is not tied is left as it is (the name
    check then refuses the missing head)."""
    from transformers import AutoConfig

    if not getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "tie_word_embeddings", False):
        return state_dict
    model, expected, _ = _reference(vllm_config)
    by_tensor = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    input_name = by_tensor[id(model.get_input_embeddings().weight)]
    output_name = by_tensor[id(model.get_output_embeddings().weight)] if model.get_output_embeddings() else None
    renamed = runtime_names(model, list(state_dict))
    present = {runtime: name for name, runtime in renamed.items()}
    if output_name is None or output_name in present or input_name not in present or output_name not in expected:
        return state_dict
    return {**state_dict, output_name: state_dict[present[input_name]]}


def check_checkpoint(vllm_config, shapes: Shapes) -> None:
    """A checkpoint folder's names and shapes against the model `vllm_config` runs, after transformers'
    renaming of its layout (`runtime_names`)."""
    model, expected, optional = _reference(vllm_config)
    renamed = runtime_names(model, list(shapes))
    check_shapes({renamed[name]: shape for name, shape in shapes.items()}, expected, optional)
