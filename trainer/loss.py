"""Answer-only, role-weighted SFT: batching token records and the per-token loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.records import TrainExample

IGNORE_INDEX = -100


def collate(examples: list[TrainExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (IGNORE_INDEX on prompt and padding)."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        ids = torch.tensor(ex.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        labels[row, ex.answer_start : len(ids)] = ids[ex.answer_start :]
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


def token_losses(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-position loss of predicting labels[:, t+1] from logits[:, t]; 0 where the label is ignored."""
    targets = labels[:, 1:]
    flat = logits[:, :-1].float().reshape(-1, logits.size(-1))
    losses = F.cross_entropy(
        flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing
    )
    return losses.view_as(targets)


def missing_roles(batches: list[list[TrainExample]], role_weights: dict[str, float]) -> set[str]:
    return {ex.role for batch in batches for ex in batch} - set(role_weights)
