"""The PMC loop (Algorithm 1 of the paper), one epoch at a time.

    references = original model's greedy answers to the forget questions        (once)
    every epoch:
        prompts  = forget questions still worth sampling       (all, or PMC-fast's unconverged ones)
        samples  = n answers per prompt from the current model                 (vLLM, one batch)
        rewards  = reward(references, samples) - short-answer penalty          (rouge_l, self_bleu, ...)
        winners  = one sample per question                                     (argmax | bradley_terry)
        PMC-fast: keep the best answer per question across epochs and train on it
        train one epoch on forget-SFT(winners) + lambda * retain-SFT
                          (+ lambda_align * (1 - gamma) * align-SFT towards refusals)   (DeepSpeed ZeRO-3)
        push the trainer's weights into the running vLLM engines (streamed from the ZeRO-3 shards)
        restart? the current model becomes the original: new greedy references

The variants (PMC-fast, PMC-alignment, Bradley-Terry, rewards, restart) are settings of this one loop.
The roles are passed in (`Rollout`, `Trainer` protocols) so the loop neither starts engines nor
knows whether they live in Ray actors. Ground-truth forget answers are not an input of this module.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.method.alignment import align_examples, alignment_weight
from pmc_pipeline.method.fast_cache import BestAnswerCache
from pmc_pipeline.method.restart import RestartPolicy
from pmc_pipeline.method.rewards import MAX_REWARD, resolve_reward, score
from pmc_pipeline.method.selection import below_best, select
from pmc_pipeline.schema import UnlearnConfig
from trainer.records import TrainExample

log = logging.getLogger(__name__)


class Rollout(Protocol):
    def sample(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
               max_tokens: int, seed: int | None = None) -> list[list[Any]]: ...
    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[Any]: ...
    def sleep(self) -> None: ...


class Trainer(Protocol):
    world_size: int
    def train_epoch(self, global_batches: list[list[TrainExample]], role_weights: dict[str, float]) -> dict: ...
    def push_weights(self) -> dict: ...


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


def interleave_with_retain(
    forget: Sequence[TrainExample], retain: Sequence[TrainExample], batch_size: int, rng: np.random.Generator,
    aligned: Sequence[TrainExample] | None = None,
) -> list[list[TrainExample]]:
    """Global batches of `batch_size` forget winners, each paired with as many random retain examples.

    Forget and retain examples alternate inside a batch so that every data-parallel rank (which takes
    every world_size-th example) gets both kinds. `aligned[i]`, when given, follows `forget[i]`.
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
            if aligned is not None:
                batch.append(aligned[index])
        batches.append(batch)
    return batches


def reference_answers(rollout: Rollout, formatter: PromptFormatter, questions: Sequence[str],
                      max_tokens: int) -> list[str]:
    """The greedy answers of the model the engine holds: the reward's references."""
    greedy = rollout.greedy([formatter.prompt_ids(q) for q in questions], max_tokens)
    return [formatter.decode(c.token_ids) for c in greedy]


class PMCLoop:
    """State and steps of one PMC run; `run()` is the whole algorithm."""

    def __init__(self, cfg: UnlearnConfig, rollout: Rollout, trainer: Trainer, formatter: PromptFormatter,
                 forget_questions: Sequence[str], retain_examples: Sequence[TrainExample],
                 references: Sequence[str] = (), refusals: Sequence[str] = ()):
        """The loop reads `cfg.pmc`, `cfg.sampling`, `cfg.seed` and the trainer's batch_size and max_length.
        `references`: the original model's greedy answers when already computed (see `reference_answers`);
        empty: `run()` computes them first. `refusals`: PMC-alignment's targets and the semantic reward's
        refusal set (pmc.refusals_file, read by the recipe)."""
        if cfg.pmc.lambda_align > 0 and not refusals:
            raise ValueError("PMC-alignment (lambda_align > 0) needs at least one refusal")
        self.pmc, self.sampling, self.seed = cfg.pmc, cfg.sampling, cfg.seed
        self.batch_size, self.max_length = cfg.trainer.batch_size, cfg.trainer.max_length
        self.refusals = list(refusals)
        self.reward_params: dict[str, Any] = ({"refusals": self.refusals,
                                               "refusal_weight": cfg.pmc.semantic_refusal_weight}
                                              if cfg.pmc.reward == "semantic" else {})
        self.rollout = rollout
        self.trainer = trainer
        self.formatter = formatter
        self.questions = list(forget_questions)
        self.prompts = [formatter.prompt_ids(q) for q in self.questions]
        self.retain_examples = list(retain_examples)
        self.references: list[str] = list(references)
        self.reward_fn = resolve_reward(cfg.pmc.reward)
        self.cache = BestAnswerCache(len(self.questions), MAX_REWARD) if cfg.pmc.fast else None
        self.rng = np.random.default_rng(cfg.seed)
        self.restart_policy = RestartPolicy(cfg.pmc)
        self.restarts: list[int] = []  # epochs after which the run restarted

    def compute_references(self) -> None:
        """The original model's greedy answers: the reward's references (again after each restart)."""
        self.references = reference_answers(self.rollout, self.formatter, self.questions,
                                            self.pmc.reference_max_tokens)

    def run_epoch(self, epoch: int) -> EpochRecord:
        p, s, seconds = self.pmc, self.sampling, {}

        start = time.perf_counter()
        active = self.cache.to_sample() if self.cache is not None else list(range(len(self.questions)))
        samples = self.rollout.sample([self.prompts[q] for q in active], s.num_samples, s.temperature, s.top_p,
                                      s.max_tokens, seed=self.seed * 100_003 + epoch) if active else []
        texts = [[self.formatter.decode(c.token_ids) for c in row] for row in samples]
        seconds["rollout"] = time.perf_counter() - start

        start = time.perf_counter()
        rewards = score(self.reward_fn, [self.references[q] for q in active], texts, p.min_len, **self.reward_params)
        # Bradley-Terry draws from a generator seeded by (seed, epoch): reproducible, restart or not
        chosen = select(rewards, p.selection, p.bt_tau, np.random.default_rng((self.seed, epoch)))
        picks = {q: (texts[j][chosen.index[j]], float(chosen.reward[j]))
                 for j, q in enumerate(active) if not chosen.degenerate[j]}
        if self.cache is not None:
            self.cache.update(list(picks), [a for a, _ in picks.values()], [r for _, r in picks.values()])
            picks = {q: (self.cache.answers[q], float(self.cache.rewards[q])) for q in self.cache.cached()}
        trained = sorted(picks)
        winners = [self.formatter.example(self.questions[q], picks[q][0], "forget", self.max_length)
                   for q in trained]
        seconds["reward"] = time.perf_counter() - start
        degenerate = [int(active[j]) for j in np.flatnonzero(chosen.degenerate)]
        if degenerate:
            # The model still says its reference answer for these: training on it would re-teach it.
            log.warning("epoch %d: %d question(s) had only zero-reward samples and are skipped this epoch; "
                        "a higher sampling temperature usually helps", epoch, len(degenerate))

        # PMC-alignment: gamma = mean reward of what the forget term trains on this epoch
        gamma = float(np.mean([picks[q][1] for q in trained])) if trained else 0.0
        role_weights = {"forget": 1.0, "retain": p.lambda_retain}
        aligned = None
        align_weight = alignment_weight(p.lambda_align, gamma) if p.lambda_align > 0 else 0.0
        if align_weight > 0:
            role_weights["align"] = align_weight
            aligned = align_examples(self.formatter, [self.questions[q] for q in trained], self.refusals,
                                     self.rng, self.max_length)

        start = time.perf_counter()
        global_batch = self.batch_size * self.trainer.world_size
        batches = interleave_with_retain(winners, self.retain_examples, global_batch, self.rng, aligned)
        if batches:
            self.rollout.sleep()  # colocated on a GPU: the engines free its memory; the push wakes them
        train = self.trainer.train_epoch(batches, role_weights) if batches else {}
        seconds["train"] = time.perf_counter() - start

        start = time.perf_counter()
        if batches:
            self.trainer.push_weights()
        seconds["weight_push"] = time.perf_counter() - start

        if self.cache is not None:
            selected = np.maximum(self.cache.rewards, 0.0)  # nothing cached yet counts as 0
        else:
            selected = chosen.reward
        extra: dict[str, Any] = {"reward": p.reward, "selection": p.selection}
        if p.fast:
            extra.update(cached_questions=len(self.cache.cached()), converged_questions=self.cache.converged())
        if p.lambda_align > 0:
            extra.update(gamma=gamma, align_weight=align_weight,
                         loss_align=train.get("role_loss", {}).get("align"))
        return EpochRecord(
            epoch=epoch,
            prompts_sampled=len(active),
            samples=sum(len(row) for row in samples),
            generated_tokens=sum(len(c.token_ids) for row in samples for c in row),
            reward_mean=float(selected.mean()) if len(selected) else 0.0,
            reward_max=float(selected.max()) if len(selected) else 0.0,
            reward_mean_all=float(rewards.mean()) if rewards.size else 0.0,
            degenerate_questions=degenerate,
            trained_questions=len(winners),
            selected_below_best=int(np.sum(below_best(rewards, chosen) & ~chosen.degenerate)),
            loss=train.get("loss"),
            loss_forget=train.get("role_loss", {}).get("forget"),
            loss_retain=train.get("role_loss", {}).get("retain"),
            seconds=seconds,
            extra=extra,
        )

    def restart(self, epoch: int) -> None:
        """Cascaded collapse: the current model (already in the engine) becomes the new original."""
        self.compute_references()
        if self.cache is not None:
            self.cache.clear()  # cached rewards were measured against the old references
        self.restart_policy.reset()
        self.restarts.append(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that the next epoch depends on (JSON-serialisable)."""
        restart = self.restart_policy
        return {
            "references": list(self.references),
            "rng": self.rng.bit_generator.state,
            "cache": None if self.cache is None else {"answers": list(self.cache.answers),
                                                      "rewards": self.cache.rewards.tolist()},
            "restart": {"epochs_since_restart": restart.epochs_since_restart, "best": restart.best,
                        "stale_epochs": restart.stale_epochs},
            "restarts": list(self.restarts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.references = list(state["references"])
        self.rng.bit_generator.state = state["rng"]
        if self.cache is not None and state["cache"] is not None:
            self.cache.answers = list(state["cache"]["answers"])
            self.cache.rewards = np.array(state["cache"]["rewards"], dtype=np.float64)
        for key, value in state["restart"].items():
            setattr(self.restart_policy, key, value)
        self.restarts = list(state["restarts"])

    def run(self, on_epoch: Callable[[EpochRecord], None] | None = None, start_epoch: int = 1) -> list[EpochRecord]:
        """Epochs start_epoch..epochs (a resumed run starts after its last checkpoint)."""
        if not self.references:
            self.compute_references()
        history = []
        for epoch in range(start_epoch, self.pmc.epochs + 1):
            record = self.run_epoch(epoch)
            reason = self.restart_policy.after_epoch(record.reward_mean)
            if reason and epoch < self.pmc.epochs:
                self.restart(epoch)
                record.extra["restart"] = reason
                log.info("epoch %d: restart (%s): the current model's greedy answers are the new references",
                         epoch, reason)
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
        return history
