"""One rank of the DeepSpeed ZeRO-3 trainer: weighted answer-only SFT, the weight push, HF checkpoints.

Every public method except `shard_report` is collective: all ranks of the group must call it, in
the same order, or the others block in a collective.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from trainer import readback
from trainer.hf_checkpoint import gathered_state_dict, write_checkpoint
from trainer.loss import answer_logprob_sums, collate, missing_roles, objective_loss, role_weighted_loss, token_kl
from trainer.records import TrainExample
from trainer.reference import FrozenReference
from trainer.scores import Objective
from trainer.config import TrainerConfig, TrainerJob, deepspeed_config, lr_factor

STATE_TAG = "state"  # the sub-folder DeepSpeed writes a resumable training state into


class Zero3Trainer:
    """One data-parallel rank; the model is partitioned across ranks from the moment it is loaded."""

    def __init__(
        self,
        config: TrainerConfig,
        job: TrainerJob,
        rank: int,
        master_addr: str,
        master_port: int,
        *,
        local_rank: int = 0,  # device index in this process: 0 when each process sees one device
    ) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        self.config, self.job, self.rank, self.world_size = config, job, rank, config.world_size
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(config.world_size),
            LOCAL_RANK=str(local_rank),
        )
        # DeepSpeed's shm all-reduce names its buffer after these; kept for the clean-up
        self._shm_name = f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"
        # DeepSpeed calls c10d functions torch deprecated; torch would warn on every step
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        torch.manual_seed(job.seed)
        deepspeed.init_distributed(dist_backend=config.process_group_backend(job.on_gpus))

        ds_config = deepspeed_config(config, job)
        # Must stay alive during from_pretrained: it makes transformers partition weights at load.
        self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(job.model_path, gguf_file=job.gguf_file,
                                                     dtype=getattr(torch, job.dtype))
        if job.gguf_file:
            # GGUF weights are dequantised on load: the model is plain and saves as such
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        # Text-only training: a multimodal model's vision tower and projector get no gradient, but
        # ZeRO-3 hands AdamW a zero gradient for them and its weight decay would still shrink them
        # every step. Frozen, they leave the optimizer and are saved as loaded (in the model dtype).
        for part in ("vision_tower", "multi_modal_projector"):
            module = getattr(getattr(model, "model", None), part, None)
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=self._optimizer(model),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config, job)),
            config=ds_config,
        )
        self.reference = FrozenReference(job, copy.deepcopy(ds_config)) if job.kl_roles else None

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """torch AdamW; no weight decay on norms and biases (1-D tensors)."""
        params = [p for p in model.parameters() if p.requires_grad]
        # under ZeRO-3 p.shape is empty; ds_shape is the real shape
        decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) > 1]
        no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) <= 1]
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.learning_rate)

    # ---- training -------------------------------------------------------------------------

    def train_steps(self, batches: list[list[TrainExample]], role_weights: dict[str, float],
                    objective: Objective | None = None) -> dict[str, Any]:
        """One micro-step per batch (this rank's share); one optimizer step per grad_accum micro-batches,
        and one more on a partial accumulation at the end, so every call ends on an optimizer step.

        The loss: sum over roles of role_weights[role] * the role's mean answer-token NLL, or, given an
        `objective`, whatever it computes from each role's answer log-probs (`AnswerScores`; a method such
        as NPO, which the trainer knows nothing of). role_weights then only name the roles expected.

        Returns token-weighted mean losses per role and overall (the objective's terms, label
        smoothing included), token counts, micro-steps, optimizer steps taken, and the lr after them.
        """
        # Epoch boundary rule: the batches are cut into groups of grad_accum from the first one; the last
        # group may be shorter and still gets its optimizer step, averaged over the micro-batches it has
        # (loss / group size, not / grad_accum). Carrying a remainder over would leave this epoch's last
        # micro-batches out of the weights pushed to the rollout engine right after this call (PMC
        # samples from the model trained on this epoch's winners), and pending gradients are not in
        # save_state, so a resume would lose them. Optimizer steps per call: ceil(len(batches) / grad_accum).
        # We set DeepSpeed's boundary ourselves: its own counter (micro_steps % grad_accum) spans calls.
        self._check_lockstep(batches, role_weights)
        steps_before = self.engine.global_steps
        accum = self.config.grad_accum
        role_sums: dict[str, float] = {}
        role_tokens: dict[str, int] = {}
        loss_sum, tokens = 0.0, 0
        for index, batch in enumerate(batches):
            group_start = index - index % accum
            group_size = min(accum, len(batches) - group_start)
            self.engine.set_gradient_accumulation_boundary(index == group_start + group_size - 1)
            loss, per_role = self._micro_step(batch, role_weights, 1.0 / group_size, objective)
            batch_tokens = sum(n for _, n in per_role.values())
            loss_sum += loss * batch_tokens
            tokens += batch_tokens
            for role, (role_loss, n) in per_role.items():
                role_sums[role] = role_sums.get(role, 0.0) + role_loss * n
                role_tokens[role] = role_tokens.get(role, 0) + n
        return {
            "loss": loss_sum / tokens if tokens else 0.0,
            "role_loss": {role: role_sums[role] / role_tokens[role] for role in role_sums},
            "role_tokens": role_tokens,
            "answer_tokens": tokens,
            "micro_steps": len(batches),
            "optimizer_steps": self.engine.global_steps - steps_before,
            "lr": self.engine.get_lr()[0],
        }

    def answer_logprob_sums(self, examples: list[TrainExample]) -> list[float]:
        """Each example's summed answer-token log-prob (end-of-answer marker included) under the current
        weights: forward only, in eval mode, log-softmax in float32. Methods that compare with the starting
        model (NPO, DPO) take these once before training instead of holding a second model."""
        size = self.job.micro_batch_size
        steps = torch.tensor([math.ceil(len(examples) / size)], device=self.engine.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # every rank runs each forward (_idle_forward)
        sums: list[float] = []
        self.engine.module.eval()
        try:
            with torch.no_grad():
                for step in range(int(steps.item())):
                    batch = examples[step * size:(step + 1) * size]
                    if not batch:
                        self._idle_forward()
                        continue
                    input_ids, mask, labels = (t.to(self.engine.device) for t in collate(batch, self.pad_id))
                    sums += answer_logprob_sums(self.engine(input_ids=input_ids, attention_mask=mask).logits, labels)
        finally:
            self.engine.module.train()
        return sums

    def _check_lockstep(self, batches: list[list[TrainExample]], role_weights: dict[str, float]) -> None:
        """All ranks agree to run, or all raise: a lone failing rank would leave the others hung."""
        missing = missing_roles(batches, role_weights)
        # on the engine's device: NCCL reduces only GPU tensors
        flags = torch.tensor([len(batches), -len(batches), int(bool(missing))], device=self.engine.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        most, fewest, any_missing = flags[0].item(), -flags[1].item(), flags[2].item()
        if missing:
            raise ValueError(f"rank {self.rank}: roles {sorted(missing)} have no entry in role_weights {role_weights}")
        if any_missing:
            raise ValueError(f"rank {self.rank}: another rank got a role missing from role_weights")
        if most != fewest:
            raise ValueError(
                f"rank {self.rank}: ranks got different numbers of micro-batches ({fewest} to {most}); "
                "every rank must take part in every micro-step (an empty micro-batch is allowed)"
            )

    def _micro_step(
        self, batch: list[TrainExample], role_weights: dict[str, float], grad_scale: float,
        objective: Objective | None = None,
    ) -> tuple[float, dict[str, tuple[float, int]]]:
        """Forward, backward (of loss * grad_scale), step; returns the (unscaled) loss and
        {role: (mean answer-token loss, tokens)}. The engine steps the optimizer only at a boundary."""
        if not batch:
            if self.reference is not None:  # its forward is collective too, and comes first on every rank
                idle = torch.full((1, 2), self.pad_id, device=self.engine.device)
                self.reference.logits(idle, torch.ones_like(idle))
            self.engine.backward(self._idle_forward().sum() * 0.0, scale_wrt_gas=False)  # at zero loss
            self.engine.step()
            return 0.0, {}
        input_ids, mask, labels = (t.to(self.engine.device) for t in collate(batch, self.pad_id))
        reference = self.reference.logits(input_ids, mask) if self.reference is not None else None
        logits = self.engine(input_ids=input_ids, attention_mask=mask).logits
        kl, kl_roles = (token_kl(logits, reference), self.job.kl_roles) if reference is not None else (None, ())
        if objective is not None:
            loss, per_role = objective_loss(logits, labels, batch, objective, kl, kl_roles)
        else:
            loss, per_role = role_weighted_loss(logits, labels, [ex.role for ex in batch], role_weights,
                                                self.config.label_smoothing, kl, kl_roles)
        self.engine.backward(loss * grad_scale, scale_wrt_gas=False)  # our scale replaces DeepSpeed's 1/grad_accum
        self.engine.step()
        return loss.item(), per_role

    def _idle_forward(self) -> torch.Tensor:
        """ZeRO-3 gathers parameters inside forward: a rank without examples must still run each one."""
        return self.engine(input_ids=torch.full((1, 2), self.pad_id, device=self.engine.device)).logits

    # ---- weights --------------------------------------------------------------------------

    def init_weight_transfer(self, init_info: Any, client: Any, bucket_bytes: int) -> None:
        """Collective. Join vLLM's weight-transfer protocol: `init_info` is this rank's `TrainerInitInfo`
        (its backend picks the transport, rollout/transfer.py), `client` reaches the engines (only rank 0
        calls it). The ranks stream the ZeRO-3 shards, gathered `bucket_bytes` of whole layers at a time."""
        # vLLM's transfer code (~10 s of imports here) is loaded by the jobs that push: not by a fine-tune
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from trainer.weight_source import Zero3Source

        self.weight_source = Zero3Source(self.engine.module, bucket_bytes, keep_copies=self.rank == 0)
        self.weight_push = {"weight_push_backend": init_info.backend, "weight_bucket_bytes": bucket_bytes,
                            "weight_push_timeout_s": getattr(init_info, "timeout_s", None)}
        self.weight_transfer = WeightTransferTrainerFactory.trainer_init(init_info, client=client,
                                                                        source=self.weight_source)

    def send_weights(self) -> dict[str, Any]:
        """Collective. The current weights into every engine (rank 0 sends, all ranks gather); this rank's
        seconds, bytes sent and peak resident-memory growth during the push."""
        from trainer.weight_source import peak_rss_growth

        start = time.perf_counter()
        with peak_rss_growth() as growth:
            self.weight_transfer.send_weights()
        return {"seconds": time.perf_counter() - start, "bytes": self.weight_source.total_bytes,
                "peak_rss_growth_bytes": growth.bytes}

    def save_pretrained(self, out_dir: str) -> None:
        """Collective. Rank 0 writes config, weights and tokenizer to a temp sibling, then renames it."""
        state = gathered_state_dict(self.engine.module, self.rank)
        if state is not None:
            write_checkpoint(self.engine.module, state, out_dir, self.job.model_path, self.job.gguf_file,
                             self.config.gradient_checkpointing)

    def save_state(self, directory: str) -> None:
        """Collective. Each rank writes its shard of weights, optimizer and lr-scheduler state and its RNG.

        DeepSpeed's own format (one file set per rank); `load_state` on the same world size resumes
        training bit for bit."""
        self.engine.save_checkpoint(directory, tag=STATE_TAG, save_latest=False,
                                    client_state={"torch_rng_state": torch.get_rng_state()})

    def load_state(self, directory: str) -> None:
        """Collective. Restore what `save_state` wrote (same model, world size and settings)."""
        path, client_state = self.engine.load_checkpoint(directory, tag=STATE_TAG, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no trainer state for rank {self.rank} in {directory}")
        torch.set_rng_state(client_state["torch_rng_state"])

    def shard_report(self) -> dict[str, dict[str, Any]]:
        return readback.shard_report(self.engine)

    def effective_settings(self) -> dict[str, Any]:
        return readback.effective_settings(self)

    def shutdown(self) -> None:
        """Leave the weight-transfer group and the process group, and remove this rank's DeepSpeed shm
        buffer (66 MB) if one was made: the process may go on to another job (`KeptRanks`)."""
        transfer = getattr(self, "weight_transfer", None)
        if transfer is not None:
            transfer.shutdown()
        self.engine.destroy()  # ZeRO-3's parameter hooks
        if self.reference is not None:
            self.reference.destroy()
        if dist.is_initialized():
            deepspeed.comm.destroy_process_group()  # torch's, and DeepSpeed's own references to its groups
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{self._shm_name}")
