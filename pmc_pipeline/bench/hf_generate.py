"""Sampling with Hugging Face `generate`, the way the reference code samples (baseline of the bench)."""

from __future__ import annotations

from typing import Any, Sequence


def hf_sample(model: Any, prompt_ids: Sequence[Sequence[int]], n: int, temperature: float, top_p: float,
              max_tokens: int, pad_id: int, eos_id: int, seed: int) -> list[list[list[int]]]:
    """n samples per prompt from one batched `generate` call; each sample's tokens end at its EOS
    (included, as vLLM reports them) and padding is dropped. Prompts are left-padded."""
    import torch

    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids):] = 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_p=top_p, top_k=0, max_new_tokens=max_tokens, num_return_sequences=n,
                             pad_token_id=pad_id, eos_token_id=eos_id)
    generated = out[:, width:].tolist()
    samples = []
    for tokens in generated:
        if eos_id in tokens:
            tokens = tokens[:tokens.index(eos_id) + 1]
        samples.append(tokens)
    return [samples[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def load_hf_model(model_dir: str, threads: int) -> Any:
    """The model in float32 (as the engine runs it), on `threads` torch threads."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
