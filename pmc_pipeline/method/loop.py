"""The PMC loop (Algorithm 1 of the paper), one epoch at a time.

    references = original model's greedy answers to the forget questions        (once)
    every epoch:
        shuffle the forget questions (the run's seeded generator); cut them into chunks
        for each chunk, in order:
            samples  = n answers per question still worth sampling (all, or PMC-fast's unconverged)  (vLLM)
            rewards  = reward(references, samples) - short-answer penalty      (rouge_l, self_bleu, ...)
            winners  = one sample per question                                 (argmax | bradley_terry)
            PMC-fast: keep the best answer per question across epochs and train on it
            train on forget-SFT(winners) + lambda * retain-SFT
                  (+ lambda_align * (1 - gamma) * align-SFT towards refusals)  (DeepSpeed ZeRO-3)
        push the trainer's weights into the running vLLM engines (streamed from the ZeRO-3 shards)
        restart? the current model becomes the original: new greedy references

Every sample of an epoch comes from the epoch-start weights (the push comes after all chunks), so the
engine may sample chunk k+1 while the trainer trains chunk k (`pmc.overlap`). Only the schedule
changes: the chunks, their seeds and every draw of the run's generator are the same, so the weights
and metrics are bit-identical with overlap on or off. The variants (PMC-fast, PMC-alignment,
Bradley-Terry, rewards, restart) are settings of this one loop. The roles are passed in (`Rollout`,
`Trainer` protocols) so the loop neither starts engines nor knows whether they live in Ray actors.
Ground-truth forget answers are not an input of this module.
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.method.alignment import align_examples, alignment_weight
from pmc_pipeline.method.fast_cache import BestAnswerCache
from pmc_pipeline.method.restart import RestartPolicy
from pmc_pipeline.method.rewards import MAX_REWARD, resolve_reward, score
from pmc_pipeline.method.selection import Selection, below_best, select
from pmc_pipeline.schema import UnlearnConfig
from trainer.records import TrainExample, merge_metrics

log = logging.getLogger(__name__)


class Rollout(Protocol):
    def sample(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
               max_tokens: int, seed: int | None = None) -> list[list[Any]]: ...
    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[Any]: ...
    def sleep(self) -> None: ...


class Trainer(Protocol):
    world_size: int
    def train_batches(self, global_batches: list[list[TrainExample]], role_weights: dict[str, float]) -> dict: ...
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


class RetainStream:
    """Retain examples in random order without replacement, reshuffled when used up; one per epoch."""

    def __init__(self, examples: Sequence[TrainExample], rng: np.random.Generator):
        self.examples, self.rng = list(examples), rng
        self.order, self.cursor = self.rng.permutation(len(self.examples)), 0

    def next(self) -> TrainExample | None:
        if not self.examples:
            return None
        if self.cursor == len(self.order):
            self.order, self.cursor = self.rng.permutation(len(self.examples)), 0
        self.cursor += 1
        return self.examples[self.order[self.cursor - 1]]


def pair_with_retain(forget: Sequence[TrainExample], retain: RetainStream, batch_size: int,
                     aligned: Sequence[TrainExample] | None = None) -> list[list[TrainExample]]:
    """Global batches of `batch_size` forget examples in the given order, each paired with the next
    retain example (and followed by `aligned[i]` when given).

    Forget and retain examples alternate inside a batch so that every data-parallel rank (which takes
    every world_size-th example) gets both kinds.
    """
    batches = []
    for start in range(0, len(forget), batch_size):
        batch: list[TrainExample] = []
        for index in range(start, min(start + batch_size, len(forget))):
            batch.append(forget[index])
            paired = retain.next()
            if paired is not None:
                batch.append(paired)
            if aligned is not None:
                batch.append(aligned[index])
        batches.append(batch)
    return batches


@dataclass
class ChunkSamples:
    """The engine side of one chunk: samples of the questions that needed them, scored and picked."""

    index: int
    questions: list[int]  # the chunk, in epoch order
    sampled: list[int]  # those sent to the engine (PMC-fast: the unconverged ones)
    texts: list[list[str]]
    tokens: int
    rewards: np.ndarray  # [sampled, n]
    chosen: Selection
    spans: list[tuple[str, float, float]]  # (phase, start, end) on time.perf_counter's clock


@dataclass
class ChunkPlan:
    """What the trainer gets for one chunk."""

    batches: list[list[TrainExample]]
    role_weights: dict[str, float]
    trained: list[int]  # questions with a winner (PMC-fast: with a cached answer)
    gamma: float  # mean reward of the trained winners
    align_weight: float


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
        # the rollout thread decodes with its own tokenizer: a Rust tokenizer refuses concurrent borrows
        self.sample_formatter = copy.deepcopy(formatter)
        self.questions = list(forget_questions)
        self.chunk_size, self.overlap = cfg.chunk_size(len(self.questions)), cfg.pmc.overlap
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
        epoch_start = time.perf_counter()
        order = self.rng.permutation(len(self.questions))
        chunks = [[int(q) for q in order[i:i + self.chunk_size]] for i in range(0, len(order), self.chunk_size)]
        retain = RetainStream(self.retain_examples, self.rng)
        to_sample = set(self.cache.to_sample()) if self.cache is not None else None
        # one seed stream per position in the epoch's order (the client gives prompt i seed + i*n)
        epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])

        def sample(k: int) -> ChunkSamples:
            return self._sample_chunk(epoch, k, chunks[k], to_sample,
                                      epoch_seed + k * self.chunk_size * self.sampling.num_samples)

        parts: list[tuple[ChunkSamples, ChunkPlan, dict]] = []
        train_spans: list[tuple[str, float, float]] = []

        def train(samples: ChunkSamples, plan: ChunkPlan) -> None:
            start = time.perf_counter()
            result = self.trainer.train_batches(plan.batches, plan.role_weights) if plan.batches else {}
            if plan.batches:
                train_spans.append(("train", start, time.perf_counter()))
            parts.append((samples, plan, result))

        if self.overlap and len(chunks) > 1:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmc-rollout") as pool:
                pending = pool.submit(sample, 0)
                for k in range(len(chunks)):
                    samples = pending.result()
                    if k + 1 < len(chunks):
                        pending = pool.submit(sample, k + 1)  # the engine works while the trainer trains chunk k
                    train(samples, self._plan_chunk(samples, retain))
        else:
            all_samples = [sample(k) for k in range(len(chunks))]
            plans = [self._plan_chunk(samples, retain) for samples in all_samples]
            if any(plan.batches for plan in plans):
                self.rollout.sleep()  # colocated on a GPU: the engines free its memory; the push wakes them
            for samples, plan in zip(all_samples, plans):
                train(samples, plan)

        push_start = time.perf_counter()
        if train_spans:
            self.trainer.push_weights()
            train_spans.append(("weight_push", push_start, time.perf_counter()))
        return self._record(epoch, parts, train_spans, epoch_start)

    def _sample_chunk(self, epoch: int, k: int, questions: list[int], to_sample: set[int] | None,
                      seed: int) -> ChunkSamples:
        """Sample, score and pick for one chunk. Runs in the rollout thread when overlapping: it reads
        only what no other step changes during an epoch (references, prompts, settings)."""
        p, s = self.pmc, self.sampling
        sampled = [q for q in questions if to_sample is None or q in to_sample]
        start = time.perf_counter()
        rows = self.rollout.sample([self.prompts[q] for q in sampled], s.num_samples, s.temperature, s.top_p,
                                   s.max_tokens, seed=seed) if sampled else []
        texts = [[self.sample_formatter.decode(c.token_ids) for c in row] for row in rows]
        sampled_at = time.perf_counter()
        rewards = score(self.reward_fn, [self.references[q] for q in sampled], texts, p.min_len, **self.reward_params)
        # Bradley-Terry draws from a generator seeded by (seed, epoch, chunk): reproducible, restart or not
        chosen = select(rewards, p.selection, p.bt_tau, np.random.default_rng((self.seed, epoch, k)))
        spans = [("reward", sampled_at, time.perf_counter())]
        if sampled:
            spans.insert(0, ("rollout", start, sampled_at))
        return ChunkSamples(k, questions, sampled, texts, sum(len(c.token_ids) for row in rows for c in row),
                            rewards, chosen, spans)

    def _plan_chunk(self, samples: ChunkSamples, retain: RetainStream) -> ChunkPlan:
        """The chunk's winners (PMC-fast: via the cache), paired with retain examples, as global batches.
        Runs in the loop's thread, chunk by chunk: the run's generator draws in the same order either way."""
        p = self.pmc
        picks = {q: (samples.texts[j][samples.chosen.index[j]], float(samples.chosen.reward[j]))
                 for j, q in enumerate(samples.sampled) if not samples.chosen.degenerate[j]}
        if self.cache is not None:
            self.cache.update(list(picks), [a for a, _ in picks.values()], [r for _, r in picks.values()])
            picks = {q: (self.cache.answers[q], float(self.cache.rewards[q]))
                     for q in samples.questions if self.cache.answers[q] is not None}
        trained = [q for q in samples.questions if q in picks]
        winners = [self.formatter.example(self.questions[q], picks[q][0], "forget", self.max_length) for q in trained]
        # PMC-alignment: gamma = mean reward of what the forget term trains on in this chunk (one chunk
        # per epoch: the paper's per-epoch gamma)
        gamma = float(np.mean([picks[q][1] for q in trained])) if trained else 0.0
        role_weights = {"forget": 1.0, "retain": p.lambda_retain}
        align_weight = alignment_weight(p.lambda_align, gamma) if p.lambda_align > 0 and trained else 0.0
        aligned = None
        if align_weight > 0:
            role_weights["align"] = align_weight
            aligned = align_examples(self.formatter, [self.questions[q] for q in trained], self.refusals,
                                     self.rng, self.max_length)
        batches = pair_with_retain(winners, retain, self.batch_size * self.trainer.world_size, aligned)
        return ChunkPlan(batches, role_weights, trained, gamma, align_weight)

    def _record(self, epoch: int, parts: list[tuple[ChunkSamples, ChunkPlan, dict]],
                train_spans: list[tuple[str, float, float]], epoch_start: float) -> EpochRecord:
        p = self.pmc
        sampled = [q for samples, _, _ in parts for q in samples.sampled]
        all_rewards = np.concatenate([samples.rewards.ravel() for samples, _, _ in parts])
        if self.cache is not None:
            selected = np.maximum(self.cache.rewards, 0.0)  # nothing cached yet counts as 0
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
            "reward": p.reward, "selection": p.selection, "overlap": self.overlap,
            "chunk_trained_questions": [len(plan.trained) for _, plan, _ in parts],  # one entry per chunk
            "timeline": [[name, round(start - epoch_start, 4), round(end - epoch_start, 4)] for name, start, end in spans],
        }
        if p.fast:
            extra.update(cached_questions=len(self.cache.cached()), converged_questions=self.cache.converged())
        if p.lambda_align > 0:
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
