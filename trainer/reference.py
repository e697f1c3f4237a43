"""The frozen starting model, held beside the trained one for the roles whose loss is a KL to it
(`TrainerJob.kl_roles`: the retain term with `retain_loss: kl`).

A KL needs the starting model's whole next-token distribution at every answer position, which does
not precompute cheaply (rows x tokens x vocabulary), so unlike the sequence sums NPO and DPO read
(computed once, `Zero3Trainer.answer_logprob_sums`) this copy stays loaded: ZeRO-3-partitioned like
the trained model (1/world size of its weights per rank), no optimizer, eval mode, no gradients.
Its forward is collective like the trained model's, so every rank runs one per micro-step.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch

from trainer.config import TrainerJob


class FrozenReference:
    def __init__(self, job: TrainerJob, ds_config: dict[str, Any]):
        from transformers import AutoModelForCausalLM

        # loaded while the trainer's HfDeepSpeedConfig is alive: partitioned at load, as the trained model
        model = AutoModelForCausalLM.from_pretrained(job.model_path, gguf_file=job.gguf_file,
                                                     dtype=getattr(torch, job.dtype))
        model.requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        self.engine.module.eval()

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.engine(input_ids=input_ids, attention_mask=attention_mask).logits

    def destroy(self) -> None:
        self.engine.destroy()
