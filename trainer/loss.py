"""Batching token records and the losses of a micro-batch: answer-only, role-weighted SFT, or an
objective over each role's answer log-probs (`trainer.scores`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.records import TrainExample
from trainer.scores import AnswerScores, Objective

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


def token_kl(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per position t: KL(p_ref || p) of the next-token distributions that predict labels[:, t+1], in float32
    (F.kl_div(log p, log p_ref, log_target=True) summed over the vocabulary, before any mask)."""
    log_p = F.log_softmax(logits[:, :-1].float(), dim=-1)
    log_ref = F.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    return (log_ref.exp() * (log_ref - log_p)).sum(-1)


def missing_roles(batches: list[list[TrainExample]], role_weights: dict[str, float]) -> set[str]:
    return {ex.role for batch in batches for ex in batch} - set(role_weights)


def role_weighted_loss(logits: torch.Tensor, labels: torch.Tensor, roles: list[str], role_weights: dict[str, float],
                       label_smoothing: float, kl: torch.Tensor | None = None, kl_roles: tuple[str, ...] = ()
                       ) -> tuple[torch.Tensor, dict[str, tuple[float, int]]]:
    """Sum over roles of role_weights[role] * the role's mean answer-token loss (`roles[i]`: row i's role),
    and {role: (that mean, its tokens)}. The loss is the NLL, or for `kl_roles` the KL from the starting
    model (`kl`: token_kl's), averaged over the same answer tokens: prompt and padding positions carry
    neither (OpenUnlearning's KL also counts them, so its value depends on the batch's padding)."""
    losses = token_losses(logits, labels, label_smoothing)
    answer = labels[:, 1:] != IGNORE_INDEX
    loss = losses.new_zeros(())
    per_role = {}
    for role in sorted(set(roles)):
        rows = torch.tensor([r == role for r in roles], device=logits.device)
        role_mask = answer & rows[:, None]
        role_loss = (kl if role in kl_roles else losses)[role_mask].mean()
        loss = loss + role_weights[role] * role_loss
        per_role[role] = (role_loss.item(), int(role_mask.sum().item()))
    return loss, per_role


def objective_loss(logits: torch.Tensor, labels: torch.Tensor, batch: list[TrainExample], objective: Objective,
                   kl: torch.Tensor | None = None, kl_roles: tuple[str, ...] = ()
                   ) -> tuple[torch.Tensor, dict[str, tuple[float, int]]]:
    """What `objective` computes from each role's answer log-probs (no label smoothing: these losses are
    functions of the label's log-prob alone; `kl_roles` also get their per-token KL from the starting
    model), and {role: (mean answer-token NLL, tokens)}."""
    logprobs = -token_losses(logits, labels, 0.0)
    answer = labels[:, 1:] != IGNORE_INDEX
    rows: dict[str, AnswerScores] = {}
    per_role = {}
    for role in sorted({ex.role for ex in batch}):
        index = [i for i, ex in enumerate(batch) if ex.role == role]
        references = [batch[i].reference_logprob for i in index]
        rows[role] = AnswerScores(logprobs[index], answer[index], None if None in references else
                                  torch.tensor(references, dtype=logprobs.dtype, device=logprobs.device),
                                  token_kl=kl[index] if role in kl_roles else None)
        per_role[role] = (rows[role].mean_nll().item(), int(rows[role].lengths.sum().item()))
    return objective(rows), per_role


def answer_logprob_sums(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each row's summed answer-token log-prob."""
    return (-token_losses(logits, labels, 0.0).sum(-1)).tolist()  # 0 where the label is ignored
