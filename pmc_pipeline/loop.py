"""The PMC loop (Algorithm 1 of the paper), one epoch at a time.

    references = original model's greedy answers to the forget questions        (once)
    every epoch:
        samples  = n answers per forget question from the current model        (vLLM, one batch)
        rewards  = 1 - ROUGE-L recall(reference, sample) (+ short-answer penalty)
        winners  = best sample per question (argmax, ties to the first drawn)
        train one epoch on lambda * retain-SFT + forget-SFT(winners)            (DeepSpeed ZeRO-3)
        push the trainer's weights into the running vLLM engine

The roles are passed in (`Rollout`, `Trainer` protocols) so the loop neither starts engines nor
knows whether they live in Ray actors. Ground-truth forget answers are not an input of this module.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from pmc_pipeline.prompts import PromptFormatter
from pmc_pipeline.reward import rouge_divergence_reward, select_argmax
from trainer.records import TrainExample

log = logging.getLogger(__name__)


class Rollout(Protocol):
    def sample(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
               max_tokens: int, seed: int | None = None) -> list[list[Any]]: ...
    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[Any]: ...
    def load_weights(self, weights: Any) -> dict: ...


class Trainer(Protocol):
    world_size: int
    def train_epoch(self, global_batches: list[list[TrainExample]], role_weights: dict[str, float]) -> dict: ...
    def export_weights(self) -> Any: ...


@dataclass
class EpochRecord:
    """One line of metrics.jsonl."""

    epoch: int
    prompts_sampled: int
    samples: int
    generated_tokens: int
    reward_mean: float  # mean reward of the selected samples
    reward_max: float
    reward_mean_all: float  # mean over every sample
    degenerate_questions: list[int]  # every sample scored 0: not trained on this epoch
    trained_questions: int
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


def interleave_with_retain(
    forget: Sequence[TrainExample], retain: Sequence[TrainExample], batch_size: int, rng: np.random.Generator
) -> list[list[TrainExample]]:
    """Global batches of `batch_size` forget winners, each paired with as many random retain examples.

    Forget and retain examples alternate inside a batch so that every data-parallel rank (which takes
    every world_size-th example) gets both kinds.
    """
    if not forget:
        return []
    order = rng.permutation(len(forget))
    retain_order = rng.permutation(len(retain)) if retain else np.array([], dtype=int)
    batches, cursor = [], 0
    for start in range(0, len(order), batch_size):
        batch: list[TrainExample] = []
        for index in order[start:start + batch_size]:
            batch.append(forget[index])
            if len(retain_order):
                if cursor == len(retain_order):
                    retain_order, cursor = rng.permutation(len(retain)), 0
                batch.append(retain[retain_order[cursor]])
                cursor += 1
        batches.append(batch)
    return batches


@dataclass
class PMCSettings:
    epochs: int
    num_samples: int
    temperature: float
    top_p: float
    max_tokens: int
    lambda_retain: float
    min_len: int
    batch_size: int  # forget examples per rank and step (each paired with a retain example)
    max_length: int
    reference_max_tokens: int
    seed: int = 0


class PMCLoop:
    """State and steps of one PMC run; `run()` is the whole algorithm."""

    def __init__(self, settings: PMCSettings, rollout: Rollout, trainer: Trainer, formatter: PromptFormatter,
                 forget_questions: Sequence[str], retain_examples: Sequence[TrainExample]):
        self.settings = settings
        self.rollout = rollout
        self.trainer = trainer
        self.formatter = formatter
        self.questions = list(forget_questions)
        self.prompts = [formatter.prompt_ids(q) for q in self.questions]
        self.retain_examples = list(retain_examples)
        self.references: list[str] = []
        self.rng = np.random.default_rng(settings.seed)

    def compute_references(self) -> None:
        """The original model's greedy answers: the reward's references, computed once."""
        greedy = self.rollout.greedy(self.prompts, self.settings.reference_max_tokens)
        self.references = [self.formatter.decode(c.token_ids) for c in greedy]

    def run_epoch(self, epoch: int) -> EpochRecord:
        s, seconds = self.settings, {}

        start = time.perf_counter()
        samples = self.rollout.sample(self.prompts, s.num_samples, s.temperature, s.top_p, s.max_tokens,
                                      seed=s.seed * 100_003 + epoch)
        texts = [[self.formatter.decode(c.token_ids) for c in row] for row in samples]
        seconds["rollout"] = time.perf_counter() - start

        start = time.perf_counter()
        rewards = rouge_divergence_reward(self.references, texts, s.min_len)
        chosen = select_argmax(rewards)
        winners = [
            self.formatter.example(self.questions[i], texts[i][chosen.index[i]], "forget", s.max_length)
            for i in range(len(self.questions)) if not chosen.degenerate[i]
        ]
        seconds["reward"] = time.perf_counter() - start
        degenerate = [int(i) for i in np.flatnonzero(chosen.degenerate)]
        if degenerate:
            # The model still says its reference answer for these: training on it would re-teach it.
            log.warning("epoch %d: %d question(s) had only zero-reward samples and are skipped this epoch; "
                        "a higher sampling temperature usually helps", epoch, len(degenerate))

        start = time.perf_counter()
        global_batch = s.batch_size * self.trainer.world_size
        batches = interleave_with_retain(winners, self.retain_examples, global_batch, self.rng)
        train = self.trainer.train_epoch(batches, {"forget": 1.0, "retain": s.lambda_retain}) if batches else {}
        seconds["train"] = time.perf_counter() - start

        start = time.perf_counter()
        if batches:
            self.rollout.load_weights(self.trainer.export_weights())
        seconds["weight_push"] = time.perf_counter() - start

        return EpochRecord(
            epoch=epoch,
            prompts_sampled=len(self.prompts),
            samples=sum(len(row) for row in samples),
            generated_tokens=sum(len(c.token_ids) for row in samples for c in row),
            reward_mean=float(chosen.reward.mean()) if len(chosen.reward) else 0.0,
            reward_max=float(chosen.reward.max()) if len(chosen.reward) else 0.0,
            reward_mean_all=float(rewards.mean()) if rewards.size else 0.0,
            degenerate_questions=degenerate,
            trained_questions=len(winners),
            loss=train.get("loss"),
            loss_forget=train.get("role_loss", {}).get("forget"),
            loss_retain=train.get("role_loss", {}).get("retain"),
            seconds=seconds,
        )

    def run(self, on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
        if not self.references:
            self.compute_references()
        history = []
        for epoch in range(1, self.settings.epochs + 1):
            record = self.run_epoch(epoch)
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
        return history
