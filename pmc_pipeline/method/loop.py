"""The PMC loop (Algorithm 1 of the paper), one epoch at a time.

    references = original model's greedy answers to the forget questions        (once)
    keep targets = original model's greedy answers to the keep questions, if any (once; kept across restarts)
    every epoch:
        shuffle the forget questions (the run's seeded generator); cut them into chunks
        for each chunk, in order:
            samples  = n answers per question still worth sampling (all, or PMC-fast's unconverged)  (vLLM)
            rewards  = reward(references, samples) - short-answer penalty      (rouge_l, self_bleu, ...)
            winners  = one sample per question                                 (argmax | bradley_terry)
            PMC-fast: keep the best answer per question across epochs and train on it
            train on forget-SFT(winners) + lambda * retain-SFT
                  (+ lambda_keep * keep-SFT towards the original model's greedy answers to data.keep)
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

import contextlib
import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.method.alignment import align_examples, alignment_weight
from pmc_pipeline.method.chunks import ChunkPlan, ChunkSamples, RetainStream, pair_with_retain
from pmc_pipeline.method.epoch_record import EpochRecord, epoch_record
from pmc_pipeline.method.fast_cache import BestAnswerCache
from pmc_pipeline.method.restart import RestartPolicy
from pmc_pipeline.method.rewards import MAX_REWARD, resolve_reward, score
from pmc_pipeline.method.rewards.rouge_l import rouge_l_recall
from pmc_pipeline.method.selection import select
from pmc_pipeline.schema import UnlearnConfig
from trainer.records import TrainExample

log = logging.getLogger(__name__)


class Rollout(Protocol):
    def sample(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
               max_tokens: int, seed: int | None = None) -> list[list[Any]]: ...
    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[Any]: ...
    def sleep(self) -> None: ...
    def share_cores(self, sharing: bool) -> None: ...


class Trainer(Protocol):
    world_size: int
    def train_batches(self, global_batches: list[list[TrainExample]], role_weights: dict[str, float]) -> dict: ...
    def push_weights(self) -> dict: ...


def reference_answers(rollout: Rollout, formatter: PromptFormatter, questions: Sequence[str],
                      max_tokens: int) -> list[str]:
    """The greedy answers of the model the engine holds: the reward's references."""
    greedy = rollout.greedy([formatter.prompt_ids(q) for q in questions], max_tokens)
    return [formatter.decode(c.token_ids) for c in greedy]


@contextlib.contextmanager
def sharing_cores(rollout: Rollout) -> Iterator[None]:
    """The engine and the trainer run on the same cores meanwhile (on CPU the engine steps down to one thread)."""
    rollout.share_cores(True)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the engine may be what failed: keep the first error
            rollout.share_cores(False)
        raise
    rollout.share_cores(False)


class PMCLoop:
    """State and steps of one PMC run; `run()` is the whole algorithm."""

    def __init__(self, cfg: UnlearnConfig, rollout: Rollout, trainer: Trainer, formatter: PromptFormatter,
                 forget_questions: Sequence[str], retain_examples: Sequence[TrainExample],
                 references: Sequence[str] = (), refusals: Sequence[str] = (),
                 keep_questions: Sequence[str] = (), keep_answers: Sequence[str] = ()):
        """The loop reads `cfg.pmc`, `cfg.sampling`, `cfg.seed` and the trainer's batch_size and max_length.
        `references`: the original model's greedy answers when already computed (see `reference_answers`);
        empty: `run()` computes them first. `refusals`: PMC-alignment's targets and the semantic reward's
        refusal set (pmc.refusals_file, read by the recipe). `keep_questions`: data.keep's questions, trained
        towards `keep_answers`, the original model's greedy answers to them (empty: `run()` computes them);
        never their ground truth, which the loop is not given."""
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
        self.keep_questions, self.keep_answers = list(keep_questions), list(keep_answers)
        self.reward_fn = resolve_reward(cfg.pmc.reward)
        self.cache = BestAnswerCache(len(self.questions), MAX_REWARD) if cfg.pmc.fast else None
        self.rng = np.random.default_rng(cfg.seed)
        self.restart_policy = RestartPolicy(cfg.pmc)
        self.restarts: list[int] = []  # epochs after which the run restarted

    def compute_references(self) -> None:
        """The original model's greedy answers: the reward's references (again after each restart)."""
        self.references = reference_answers(self.rollout, self.formatter, self.questions,
                                            self.pmc.reference_max_tokens)

    def compute_keep_answers(self) -> None:
        """The original model's greedy answers to the keep questions: the keep term's targets (once: a
        restart changes the references, not what must be kept)."""
        self.keep_answers = reference_answers(self.rollout, self.formatter, self.keep_questions,
                                              self.pmc.reference_max_tokens)

    def keep_examples(self) -> list[TrainExample]:
        """The keep term's rows: each keep question with the original model's answer (an empty answer has
        no tokens to keep and is left out)."""
        return [self.formatter.example(q, a, "keep", self.max_length)
                for q, a in zip(self.keep_questions, self.keep_answers) if a.strip()]

    def drift(self) -> dict[str, float]:
        """What the model the engine holds still says, measured without any ground truth: the mean ROUGE-L
        recall of the references (the original model's answers) in its greedy forget answers (what the
        reward pushes down), and, with a keep set, of the starting keep answers in its greedy keep answers
        (1.0: unchanged; what the keep term holds up)."""
        def recall(questions: list[str], targets: list[str]) -> float:
            answers = reference_answers(self.rollout, self.formatter, questions, self.pmc.reference_max_tokens)
            return float(rouge_l_recall(targets, answers).mean())

        scores = {"drift_reference_recall": recall(self.questions, self.references)}
        if self.keep_questions:
            scores["drift_keep_recall"] = recall(self.keep_questions, self.keep_answers)
        return scores

    def run_epoch(self, epoch: int) -> EpochRecord:
        epoch_start = time.perf_counter()
        order = self.rng.permutation(len(self.questions))
        chunks = [[int(q) for q in order[i:i + self.chunk_size]] for i in range(0, len(order), self.chunk_size)]
        retain = RetainStream(self.retain_examples, self.rng)
        keep = RetainStream(self.keep_examples(), self.rng) if self.keep_questions else None
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
            with sharing_cores(self.rollout), ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmc-rollout") as pool:
                pending = pool.submit(sample, 0)
                for k in range(len(chunks)):
                    samples = pending.result()
                    if k + 1 < len(chunks):
                        pending = pool.submit(sample, k + 1)  # the engine works while the trainer trains chunk k
                    train(samples, self._plan_chunk(samples, retain, keep))
        else:
            all_samples = [sample(k) for k in range(len(chunks))]
            plans = [self._plan_chunk(samples, retain, keep) for samples in all_samples]
            if any(plan.batches for plan in plans):
                self.rollout.sleep()  # colocated on a GPU: the engines free its memory; the push wakes them
            for samples, plan in zip(all_samples, plans):
                train(samples, plan)

        push_start = time.perf_counter()
        if train_spans:
            self.trainer.push_weights()
            train_spans.append(("weight_push", push_start, time.perf_counter()))
        return epoch_record(epoch, self.pmc, self.cache, self.overlap, parts, train_spans, epoch_start)

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

    def _plan_chunk(self, samples: ChunkSamples, retain: RetainStream, keep: RetainStream | None) -> ChunkPlan:
        """The chunk's winners (PMC-fast: via the cache), paired with retain (and keep) examples, as global
        batches.
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
        if keep is not None:
            role_weights["keep"] = p.lambda_keep
        align_weight = alignment_weight(p.lambda_align, gamma) if p.lambda_align > 0 and trained else 0.0
        aligned = None
        if align_weight > 0:
            role_weights["align"] = align_weight
            aligned = align_examples(self.formatter, [self.questions[q] for q in trained], self.refusals,
                                     self.rng, self.max_length)
        batches = pair_with_retain(winners, retain, self.batch_size * self.trainer.world_size, aligned, keep)
        return ChunkPlan(batches, role_weights, trained, gamma, align_weight)

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
            "keep_answers": list(self.keep_answers),
            "rng": self.rng.bit_generator.state,
            "cache": None if self.cache is None else {"answers": list(self.cache.answers),
                                                      "rewards": self.cache.rewards.tolist()},
            "restart": {"epochs_since_restart": restart.epochs_since_restart, "best": restart.best,
                        "stale_epochs": restart.stale_epochs},
            "restarts": list(self.restarts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.references = list(state["references"])
        self.keep_answers = list(state.get("keep_answers", []))  # absent in checkpoints of runs without a keep set
        self.rng.bit_generator.state = state["rng"]
        if self.cache is not None and state["cache"] is not None:
            self.cache.answers = list(state["cache"]["answers"])
            self.cache.rewards = np.array(state["cache"]["rewards"], dtype=np.float64)
        for key, value in state["restart"].items():
            setattr(self.restart_policy, key, value)
        self.restarts = list(state["restarts"])

    def run(self, on_epoch: Callable[[EpochRecord], str | None] | None = None,
            start_epoch: int = 1) -> list[EpochRecord]:
        """Epochs start_epoch..epochs (a resumed run starts after its last checkpoint); on_epoch returning a
        reason (the stopping rule's) ends the run after that epoch."""
        if not self.references:
            self.compute_references()
        if self.keep_questions and not self.keep_answers:
            self.compute_keep_answers()
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
            if on_epoch is not None and on_epoch(record):
                break
        return history
