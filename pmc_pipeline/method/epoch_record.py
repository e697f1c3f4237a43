"""One line of metrics.jsonl: what an epoch did, summed over its chunks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pmc_pipeline.method.chunks import ChunkPlan, ChunkSamples
from pmc_pipeline.method.fast_cache import BestAnswerCache
from pmc_pipeline.method.selection import below_best
from pmc_pipeline.schema import PMCConfig
from trainer.records import merge_metrics

log = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    """One line of metrics.jsonl."""

    epoch: int
    prompts_sampled: int
    samples: int
    generated_tokens: int
    reward_mean: float  # mean reward of the selected samples (PMC-fast: of the cached best, 0 if none)
    reward_max: float
    reward_mean_all: float  # mean over every sample
    degenerate_questions: list[int]  # every sample scored 0: not trained on this epoch
    trained_questions: int
    selected_below_best: int  # non-degenerate winners scoring below their question's best sample (argmax: 0)
    loss: float | None
    loss_forget: float | None
    loss_retain: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        record = {k: v for k, v in self.__dict__.items() if k not in ("seconds", "extra")}
        record.update({f"seconds_{k}": round(v, 4) for k, v in self.seconds.items()})
        record.update(self.extra)
        return record

    def progress(self) -> str:
        """The epoch's log line."""
        def loss(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        s = self.seconds
        return (f"reward {self.reward_mean:.3f} (max {self.reward_max:.3f}), loss forget {loss(self.loss_forget)} "
                f"retain {loss(self.loss_retain)}, {self.prompts_sampled} prompts, {s['epoch']:.1f} s: "
                f"{s['rollout']:.1f} s rollout / {s['train']:.1f} s train / {s['weight_push']:.1f} s push")


def epoch_record(epoch: int, pmc: PMCConfig, cache: BestAnswerCache | None, overlap: bool,
                 parts: list[tuple[ChunkSamples, ChunkPlan, dict]], train_spans: list[tuple[str, float, float]],
                 epoch_start: float) -> EpochRecord:
    """The metrics line of an epoch from its chunks (engine side, plan, trainer result) and spans."""
    sampled = [q for samples, _, _ in parts for q in samples.sampled]
    all_rewards = np.concatenate([samples.rewards.ravel() for samples, _, _ in parts])
    if cache is not None:
        selected = np.maximum(cache.rewards, 0.0)  # nothing cached yet counts as 0
    else:
        selected = np.concatenate([samples.chosen.reward for samples, _, _ in parts])
    degenerate = sorted(q for samples, _, _ in parts for j, q in enumerate(samples.sampled)
                        if samples.chosen.degenerate[j])
    if degenerate:
        # The model still says its reference answer for these: training on it would re-teach it.
        log.warning("epoch %d: %d question(s) had only zero-reward samples and are skipped this epoch; "
                    "a higher sampling temperature usually helps", epoch, len(degenerate))
    spans = sorted([span for samples, _, _ in parts for span in samples.spans] + train_spans, key=lambda x: x[1])
    seconds = {phase: sum(end - start for name, start, end in spans if name == phase)
               for phase in ("rollout", "reward", "train", "weight_push")}
    seconds["epoch"] = time.perf_counter() - epoch_start
    results = [result for _, _, result in parts if result]
    train = merge_metrics(results) if results else {}
    trained = [q for _, plan, _ in parts for q in plan.trained]
    extra: dict[str, Any] = {
        "reward": pmc.reward, "selection": pmc.selection, "overlap": overlap,
        "chunk_trained_questions": [len(plan.trained) for _, plan, _ in parts],  # one entry per chunk
        "timeline": [[name, round(start - epoch_start, 4), round(end - epoch_start, 4)] for name, start, end in spans],
    }
    if "keep" in train.get("role_loss", {}):  # data.keep's term
        extra["loss_keep"] = train["role_loss"]["keep"]
    if pmc.fast:
        extra.update(cached_questions=len(cache.cached()), converged_questions=cache.converged())
    if pmc.lambda_align > 0:
        plans = [plan for _, plan, _ in parts]
        extra.update(gamma=sum(plan.gamma * len(plan.trained) for plan in plans) / len(trained) if trained else 0.0,
                     chunk_gammas=[plan.gamma for plan in plans],
                     align_weights=[plan.align_weight for plan in plans],  # what each chunk trained with
                     loss_align=train.get("role_loss", {}).get("align"))
    return EpochRecord(
        epoch=epoch,
        prompts_sampled=len(sampled),
        samples=sum(len(row) for samples, _, _ in parts for row in samples.texts),
        generated_tokens=sum(samples.tokens for samples, _, _ in parts),
        reward_mean=float(selected.mean()) if len(selected) else 0.0,
        reward_max=float(selected.max()) if len(selected) else 0.0,
        reward_mean_all=float(all_rewards.mean()) if all_rewards.size else 0.0,
        degenerate_questions=degenerate,
        trained_questions=len(trained),
        selected_below_best=sum(int(np.sum(below_best(samples.rewards, samples.chosen) & ~samples.chosen.degenerate))
                                for samples, _, _ in parts),
        loss=train.get("loss"),
        loss_forget=train.get("role_loss", {}).get("forget"),
        loss_retain=train.get("role_loss", {}).get("retain"),
        seconds=seconds,
        extra=extra,
    )
