"""One PMC epoch done the reference code's way, as the baseline of the epoch comparison.

The reference trains in one process and samples inside every training step: for each step's batch
of forget questions it calls HF `generate` for n answers each, scores them, keeps the winners and
takes one optimizer step on winners + paired retain examples. Here that runs as plain single-process
PyTorch: the reference's DeepSpeed at world size 1 shards nothing, so this is the same arithmetic
without DeepSpeed's bookkeeping (if anything, a slightly faster baseline). Loss, optimizer, gradient
clipping, batch, reward and selection are the pipeline's own.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from pmc_pipeline.bench.hf_generate import hf_sample, load_hf_model
from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.method.chunks import RetainStream, pair_with_retain
from pmc_pipeline.method.rewards import score
from pmc_pipeline.method.rewards.rouge_l import rouge_l_reward
from pmc_pipeline.method.selection import select_argmax
from pmc_pipeline.schema import UnlearnConfig
from trainer.records import TrainExample


class ReferenceStyleEpochs:
    """The model and optimizer persist across epochs, like a training run."""

    def __init__(self, model_dir: str, cfg: UnlearnConfig, formatter: PromptFormatter, questions: Sequence[str],
                 references: Sequence[str], retain: Sequence[TrainExample], threads: int = 1):
        """`cfg`: the unlearn config the pipeline epoch runs with (sampling, pmc, trainer sections)."""
        import torch

        self.cfg, self.formatter = cfg, formatter
        self.questions, self.references, self.retain = list(questions), list(references), list(retain)
        self.prompts = [formatter.prompt_ids(q) for q in self.questions]
        self.global_batch = cfg.trainer.batch_size * cfg.trainer.world_size
        self.model = load_hf_model(model_dir, threads)
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        self.eos_id = formatter.tokenizer.eos_token_id
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.trainer.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.trainer.learning_rate)
        self.rng = np.random.default_rng(cfg.seed)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Seconds per phase (summed over steps), generated tokens and steps of one epoch."""
        s, cfg = self.cfg.sampling, self.cfg
        seconds = {"rollout": 0.0, "reward": 0.0, "train": 0.0}
        tokens, steps = 0, 0
        order = self.rng.permutation(len(self.questions))
        retain = RetainStream(self.retain, self.rng)
        for start in range(0, len(order), self.global_batch):
            chunk = [int(i) for i in order[start:start + self.global_batch]]
            t0 = time.perf_counter()
            self.model.eval()
            samples = hf_sample(self.model, [self.prompts[i] for i in chunk], s.num_samples, s.temperature,
                                s.top_p, s.max_tokens, self.pad_id, self.eos_id, seed=cfg.seed * 100_003 + epoch + start)
            texts = [[self.formatter.decode(t) for t in row] for row in samples]
            tokens += sum(len(t) for row in samples for t in row)
            t1 = time.perf_counter()
            rewards = score(rouge_l_reward, [self.references[i] for i in chunk], texts, cfg.pmc.min_len)
            chosen = select_argmax(rewards)
            winners = [self.formatter.example(self.questions[q], texts[k][chosen.index[k]], "forget", cfg.trainer.max_length)
                       for k, q in enumerate(chunk) if not chosen.degenerate[k]]
            t2 = time.perf_counter()
            if winners:
                batch = pair_with_retain(winners, retain, len(winners))[0]
                self._train_step(batch, {"forget": 1.0, "retain": cfg.pmc.lambda_retain})
                steps += 1
            t3 = time.perf_counter()
            seconds["rollout"] += t1 - t0
            seconds["reward"] += t2 - t1
            seconds["train"] += t3 - t2
        return {"seconds": seconds, "generated_tokens": tokens, "steps": steps}

    def _train_step(self, batch: list[TrainExample], role_weights: dict[str, float]) -> None:
        import torch

        from trainer.loss import IGNORE_INDEX, collate, token_losses

        self.model.train()
        input_ids, mask, labels = collate(batch, self.pad_id)
        losses = token_losses(self.model(input_ids=input_ids, attention_mask=mask).logits, labels, 0.0)
        answer = labels[:, 1:] != IGNORE_INDEX
        loss = losses.new_zeros(())
        for role in sorted({ex.role for ex in batch}):
            rows = torch.tensor([ex.role == role for ex in batch])
            loss = loss + role_weights[role] * losses[answer & rows[:, None]].mean()
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # the trainer's gradient_clipping
        self.optimizer.step()
