"""A ZeRO-3 model as a Hugging Face checkpoint folder: its shards gathered to whole tensors on rank 0, then
config, weights, tokenizer (and a multimodal model's processor files) written to a temp folder and renamed."""

from __future__ import annotations

import shutil
from pathlib import Path

import deepspeed
import torch

from trainer.files import atomic_dir

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def gathered_state_dict(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """Collective. HF-named full tensors on rank 0 (None elsewhere), gathering one parameter at a time."""
    state: dict[str, torch.Tensor] = {}
    first_name: dict[int, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in first_name:  # tied weights: one gather, separate copies for safetensors
            if rank == 0:
                state[name] = state[first_name[id(tensor)]].clone()
            continue
        first_name[id(tensor)] = name
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=hasattr(tensor, "ds_id")):
            if rank == 0:
                state[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return state if rank == 0 else None


def write_checkpoint(module: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: str, model_path: str,
                     gguf_file: str | None, gradient_checkpointing: bool) -> None:
    """`module`'s config with `state` as its weights, and the tokenizer of `model_path`, into `out_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, gguf_file=gguf_file)
    # Gradient checkpointing turned the KV cache off for training; a saved checkpoint is for
    # generation (HF generate without a cache recomputes every step), so it is saved with it on.
    configs = [c for c in (module.config, getattr(module.config, "text_config", None))
               if c is not None and getattr(c, "use_cache", None) is False and gradient_checkpointing]
    with atomic_dir(Path(out_dir)) as tmp:
        try:
            for config in configs:
                config.use_cache = True
            module.save_pretrained(tmp, state_dict=state)
        finally:
            for config in configs:
                config.use_cache = False
        tokenizer.save_pretrained(tmp)
        # A multimodal model (Gemma-3) needs its processor files to start in vLLM; the tokenizer
        # does not carry them, so they are copied from a local source folder as they are.
        source = Path(model_path)
        for name in PROCESSOR_FILES:
            if (source / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(source / name, tmp / name)
