"""Likelihood scoring on a running `vllm.LLM`: prompt log-probs, and answer log-probs through the prefix cache.

TOFU's metrics ask many answers of one question (the answer, its paraphrase and five perturbed ones);
~60% of each sequence is the question and chat template. vLLM skips the prefix cache for prompt
log-probs, so `answer_logprob_ranks` prefills each distinct question once and scores the answers with
the cache read. A cached position yields no log-prob: an answer whose own tokens were found cached
(another answer began the same way) is scored again without the cache. Both ways give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AnswerScoring:
    """`rows[i]`: (log-prob, vocabulary rank, 1 = the argmax) of each answer token of sequence i."""

    rows: list[list[tuple[float, int]]]
    prefix_cached_tokens: int  # prompt tokens the scoring pass read from the cache
    rescored_uncached: int  # answers scored again without it


def _params(**kwargs: Any) -> Any:
    from vllm import SamplingParams

    # one generated token is vLLM's minimum; detokenize=False: only token ids are read back
    return SamplingParams(n=1, temperature=0.0, max_tokens=1, detokenize=False, **kwargs)


def _prompts(token_ids: list[list[int]] | list[tuple[int, ...]]) -> list[Any]:
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=list(ids)) for ids in token_ids]


def prompt_logprobs(llm: Any, prompt_ids: list[list[int]]) -> list[list[float | None]]:
    """log p(token_t | tokens_<t) for every prompt token (None for the first), one batched call, uncached."""
    # prompt_logprobs=0: the prompt's own token only; skip_reading_prefix_cache (vLLM's default for prompt
    # log-probs) said here because a cached position would have none
    outputs = llm.generate(_prompts(prompt_ids), _params(prompt_logprobs=0, skip_reading_prefix_cache=True),
                           use_tqdm=False)
    return [[None if entry is None else float(entry[token].logprob) for token, entry in zip(ids, out.prompt_logprobs)]
            for ids, out in zip(prompt_ids, outputs)]


def answer_logprob_ranks(llm: Any, sequences: list[tuple[list[int], int]], prefix_caching: bool) -> AnswerScoring:
    """Each (token ids, answer start)'s answer-token log-probs and ranks; the question prompts are read
    from the prefix cache when the engine has one."""
    for index, (ids, start) in enumerate(sequences):
        if not 0 < start < len(ids):
            raise ValueError(f"sequence {index}: answer start {start} is outside its {len(ids)} tokens")
    if not sequences:
        return AnswerScoring([], 0, 0)

    def score(items: list[tuple[list[int], int]], read_cache: bool) -> list[Any]:
        return llm.generate(_prompts([ids for ids, _ in items]),
                            _params(prompt_logprobs=0, skip_reading_prefix_cache=not read_cache), use_tqdm=False)

    if prefix_caching:
        # one token short of the answer, so a primed block never covers position start - 1
        prefixes = list(dict.fromkeys(tuple(ids[:start - 1]) for ids, start in sequences if start > 1))
        llm.generate(_prompts(prefixes), _params(), use_tqdm=False)
    outputs = score(sequences, read_cache=prefix_caching)
    cached = sum(out.num_cached_tokens or 0 for out in outputs)
    # log p(token t) comes from position t - 1: it exists iff fewer than `start` tokens were cached
    again = [i for i, ((_, start), out) in enumerate(zip(sequences, outputs)) if (out.num_cached_tokens or 0) >= start]
    if again:
        for i, out in zip(again, score([sequences[i] for i in again], read_cache=False)):
            outputs[i] = out
    rows = [[(float(entry[token].logprob), int(entry[token].rank))
             for token, entry in zip(ids[start:], out.prompt_logprobs[start:])]
            for (ids, start), out in zip(sequences, outputs)]
    return AnswerScoring(rows, cached, len(again))
