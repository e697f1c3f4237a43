"""What a trainer rank actually runs with, read back from torch, DeepSpeed and the model rather than from
its config (the driver writes it to the run's roles.json), and where its parameters live."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def shard_report(engine: Any) -> dict[str, dict[str, Any]]:
    """Per parameter: elements this rank owns, full size, and whether a full copy is held now."""
    return {
        name: {
            "local_numel": param.ds_tensor.numel(),
            "full_numel": param.ds_numel,
            "gathered": param.numel() == param.ds_numel,
        }
        for name, param in engine.module.named_parameters()
    }


def effective_settings(trainer: Any) -> dict[str, Any]:
    """What this rank runs with, read back from torch, DeepSpeed and the model rather than from the
    config: a setting lost on its way shows up here (the driver writes it to the run's roles.json)."""
    groups = trainer.engine.optimizer.optimizer.param_groups if hasattr(trainer.engine.optimizer, "optimizer") \
        else trainer.engine.optimizer.param_groups
    return {
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "learning_rate": groups[0]["initial_lr"],
        "weight_decay": max(g["weight_decay"] for g in groups),
        "micro_batch_size": trainer.engine.train_micro_batch_size_per_gpu(),
        "grad_accum": trainer.engine.gradient_accumulation_steps(),
        "warmup_steps": trainer.job.warmup_steps(trainer.config),
        "gradient_checkpointing": bool(trainer.engine.module.is_gradient_checkpointing),
        "label_smoothing": trainer.config.label_smoothing,  # read by token_losses on every step
        "torch_threads": torch.get_num_threads(),
        "dtype": str(next(trainer.engine.module.parameters()).dtype).removeprefix("torch."),
        "model_path": trainer.job.model_path,
        "kl_roles": list(trainer.job.kl_roles),  # their term is the KL from the frozen starting model
        **getattr(trainer, "weight_push", {}),  # once the weight push is connected
    }
