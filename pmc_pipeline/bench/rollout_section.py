"""Rollout throughput: the vLLM worker vs Hugging Face `generate` on the same model and prompts.

Both get the same prompts (token ids), n, temperature, top_p and max_tokens, and one CPU thread each
(the engine actor runs with one OpenMP thread). Tokens/s counts generated tokens up to and including
EOS; HF `generate` keeps stepping finished rows of a batch until the longest is done, which is part
of its cost and not counted as output.
"""

from __future__ import annotations

from typing import Any, Sequence

from pmc_pipeline.bench.figures import BenchReport, timed
from pmc_pipeline.bench.hf_generate import hf_sample


def batch_of(prompts: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """The first `size` prompts, cycling when there are fewer."""
    return [list(prompts[i % len(prompts)]) for i in range(size)]


def bench_rollout(report: BenchReport, rollout: Any, hf_model: Any, prompts: Sequence[Sequence[int]],
                  batch_sizes: Sequence[int], n: int, temperature: float, top_p: float, max_tokens: int,
                  pad_id: int, eos_id: int, repeats: int, seed: int = 0) -> None:
    """Adds rollout.vllm.b<B>, rollout.hf_generate.b<B> (tokens/s) and their ratio per batch size."""
    for size in batch_sizes:
        batch = batch_of(prompts, size)
        vllm_rates, hf_rates = [], []
        for repeat in range(repeats):
            seconds, samples = timed(lambda: rollout.sample(batch, n, temperature, top_p, max_tokens,
                                                            seed=seed + repeat))
            vllm_rates.append(sum(len(c.token_ids) for row in samples for c in row) / seconds)
            seconds, hf = timed(lambda: hf_sample(hf_model, batch, n, temperature, top_p, max_tokens,
                                                  pad_id, eos_id, seed + repeat))
            hf_rates.append(sum(len(tokens) for row in hf for tokens in row) / seconds)
        what = f"{size} prompts x n={n}, T={temperature}, top_p={top_p}, max_tokens={max_tokens}"
        report.add(f"rollout.vllm.b{size}", "tokens/s", vllm_rates, what)
        report.add(f"rollout.hf_generate.b{size}", "tokens/s", hf_rates, what)
        report.add_ratio(f"rollout.speedup.b{size}", f"rollout.vllm.b{size}", f"rollout.hf_generate.b{size}",
                         "vLLM / HF generate")
