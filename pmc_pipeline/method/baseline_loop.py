"""A baseline's epochs (GA, GD, IDK, DPO, NPO, SimNPO) on the same ZeRO-3 trainer as PMC, without sampling.

    before epoch 1: one refusal line per forget question, drawn once (seeded by `seed`; IDK, DPO);
                    the starting model's summed answer log-probs of every row the loss compares with it
                    (DPO, NPO), forward only on the trainer: no second model is held through the run
    every epoch:    shuffle the forget questions; each question's rows (its true answer, its refusal) are
                    paired with the next retain example, batch_size x world_size questions per optimizer
                    step; loss = the method's forget term + lambda * retain NLL (method/baselines/)
                    push the weights into the engine only when an evaluation reads them next

Unlike PMC, GA, GD, DPO, NPO and SimNPO train on the ground-truth forget answers; the recipe says so.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.method.baselines import FORGET, REFUSALS, RETAIN, BaselineObjective, idk_targets, resolve_baseline
from pmc_pipeline.method.chunks import RetainStream, pair_with_retain
from pmc_pipeline.schema import UnlearnConfig
from trainer.records import TrainExample


@dataclass
class BaselineEpochRecord:
    """One line of a baseline run's metrics.jsonl."""

    epoch: int
    method: str
    trained_questions: int
    loss: float  # the method's objective, token-weighted over the epoch's micro-batches
    role_nll: dict[str, float]  # mean answer-token NLL of each role's rows (forget: the true answers)
    optimizer_steps: int
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        record = {"epoch": self.epoch, "method": self.method, "trained_questions": self.trained_questions,
                  "loss": self.loss, "optimizer_steps": self.optimizer_steps}
        record.update({f"nll_{role}": value for role, value in sorted(self.role_nll.items())})
        record.update({f"seconds_{k}": round(v, 4) for k, v in self.seconds.items()})
        record.update(self.extra)
        return record

    def progress(self) -> str:
        nll = ", ".join(f"{role} {value:.4f}" for role, value in sorted(self.role_nll.items()))
        return (f"{self.method} loss {self.loss:.4f} (answer NLL: {nll}), {self.optimizer_steps} steps, "
                f"{self.seconds['epoch']:.1f} s: {self.seconds['train']:.1f} s train / "
                f"{self.seconds['weight_push']:.1f} s push")


class BaselineLoop:
    """State and steps of one baseline run; `run()` is the whole method. The trainer is a `TrainerGroup`
    (train_batches with an objective, answer_logprob_sums, push_weights)."""

    def __init__(self, cfg: UnlearnConfig, trainer: Any, formatter: PromptFormatter, questions: Sequence[str],
                 answers: Sequence[str] | None, retain_examples: Sequence[TrainExample], refusals: Sequence[str] = (),
                 push_after: Callable[[int], bool] = lambda epoch: False):
        """`answers`: the forget questions' ground-truth answers, for the methods that train on them (None
        for IDK); `push_after(epoch)`: whether the engine needs the epoch's weights (an evaluation follows)."""
        self.baseline = resolve_baseline(cfg.method)
        if self.baseline.trains_on_forget_answers and (answers is None or len(answers) != len(questions)):
            raise ValueError(f"{cfg.method} trains on the forget answers: one answer per forget question expected")
        self.objective = BaselineObjective(cfg.method, cfg.baseline.lambda_retain, cfg.baseline.overrides(),
                                           cfg.retain_loss)
        self.lambda_retain = (self.baseline.lambda_retain if cfg.baseline.lambda_retain is None
                              else cfg.baseline.lambda_retain)
        self.epochs, self.trainer, self.formatter = cfg.baseline.epochs, trainer, formatter
        self.global_batch = cfg.trainer.batch_size * trainer.world_size
        self.max_length = cfg.trainer.max_length
        self.questions, self.answers = list(questions), None if answers is None else list(answers)
        # no retain term (GA): no retain rows in the batches either
        self.retain_examples = list(retain_examples) if self.lambda_retain > 0 else []
        self.rng = np.random.default_rng(cfg.seed)
        self.refusal_targets: list[str] = []
        if REFUSALS in self.baseline.reads:
            picks = idk_targets(self.questions, refusals, random.Random(cfg.seed))
            self.refusal_targets = [refusal for _, refusal in picks]
        self.reference_sums: dict[str, list[float]] = {}
        self.push_after = push_after

    def rows(self, role: str) -> list[TrainExample]:
        """Every forget question's row of `role`, in data order, with its reference log-prob once computed."""
        targets = self.answers if role == FORGET else self.refusal_targets
        examples = [self.formatter.example(q, a, role, self.max_length) for q, a in zip(self.questions, targets)]
        sums = self.reference_sums.get(role)
        if sums is None:
            return examples
        return [dataclasses.replace(ex, reference_logprob=s) for ex, s in zip(examples, sums)]

    def compute_references(self) -> None:
        """The starting model's summed answer log-probs of every row the loss compares with it (before epoch 1)."""
        if self.baseline.needs_reference:
            self.reference_sums = {role: self.trainer.answer_logprob_sums(self.rows(role))
                                   for role in self.baseline.reads}

    def run_epoch(self, epoch: int) -> BaselineEpochRecord:
        start = time.perf_counter()
        order = [int(i) for i in self.rng.permutation(len(self.questions))]
        retain = RetainStream(self.retain_examples, self.rng)
        by_role = {role: self.rows(role) for role in self.baseline.reads}
        first, *others = self.baseline.reads
        batches = pair_with_retain([by_role[first][i] for i in order], retain, self.global_batch,
                                   [by_role[others[0]][i] for i in order] if others else None)
        roles = {*self.baseline.reads, *([RETAIN] if self.retain_examples else [])}
        result = self.trainer.train_batches(batches, {role: 1.0 for role in roles}, self.objective)
        trained = time.perf_counter()
        if self.push_after(epoch):
            self.trainer.push_weights()
        seconds = {"train": trained - start, "weight_push": time.perf_counter() - trained,
                   "epoch": time.perf_counter() - start}
        return BaselineEpochRecord(epoch, self.baseline.name, len(order), result["loss"], result["role_loss"],
                                   result["optimizer_steps"], seconds)

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that the next epoch depends on (JSON-serialisable)."""
        return {"rng": self.rng.bit_generator.state, "refusal_targets": list(self.refusal_targets),
                "reference_sums": {role: list(sums) for role, sums in self.reference_sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.refusal_targets = list(state["refusal_targets"])
        self.reference_sums = {role: list(sums) for role, sums in state["reference_sums"].items()}

    def run(self, on_epoch: Callable[[BaselineEpochRecord], None] | None = None,
            start_epoch: int = 1) -> list[BaselineEpochRecord]:
        """Epochs start_epoch..epochs (a resumed run starts after its last checkpoint, references loaded)."""
        if start_epoch == 1:
            self.compute_references()
        history = []
        for epoch in range(start_epoch, self.epochs + 1):
            record = self.run_epoch(epoch)
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
        return history
