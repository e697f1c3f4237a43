"""The reference the engine tests compare vLLM with: transformers' own greedy decoding (tests only)."""

from __future__ import annotations

import torch


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[tuple[int, ...]]:
    """Transformers' greedy continuation of each prompt, one prompt at a time (no padding)."""
    answers = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
            answers.append(tuple(out[0, len(ids):].tolist()))
    return answers
