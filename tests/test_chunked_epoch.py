"""The chunked epoch on fake roles (no engine): how questions are cut into chunks, what each chunk's
trainer call gets, and that the overlapped schedule (the engine samples chunk k+1 while the trainer
trains chunk k) changes only the order of work, never what is computed.
tests/test_variants_engines.py compares the two schedules' weights on real engines."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import pytest

from pmc_pipeline.config import from_mapping
from pmc_pipeline.errors import ConfigError
from pmc_pipeline.method.loop import PMCLoop
from trainer.records import TrainExample

QUESTIONS = [f"question {i}" for i in range(10)]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
REFERENCE = "alpha beta gamma delta epsilon"


@dataclass
class Completion:
    token_ids: tuple


class TextFormatter:
    def prompt_ids(self, question: str) -> list[int]:
        return [ord(c) for c in question]

    def decode(self, token_ids) -> str:
        return "".join(chr(t) for t in token_ids)

    def example(self, question, answer, role, max_length=None) -> TrainExample:
        return TrainExample(input_ids=tuple(ord(c) for c in question + "|" + answer), answer_start=len(question) + 1,
                            role=role)


class SeededRollout:
    """Sample j of prompt i is three words drawn from Random(seed + i*n + j), as vLLM's seeds work;
    `log` records when each call starts."""

    def __init__(self, log: list[str] | None = None):
        self.calls: list[tuple[list[str], int]] = []
        self.log = log if log is not None else []
        self.called = threading.Condition()

    def sample(self, prompt_ids, n, temperature, top_p, max_tokens, seed=None):
        self.log.append(f"sample {len(self.calls)}")
        questions = ["".join(map(chr, p)) for p in prompt_ids]
        with self.called:
            self.calls.append((questions, seed))
            self.called.notify_all()
        rows = []
        for i in range(len(questions)):
            row = []
            for j in range(n):
                words = random.Random(seed + i * n + j).sample(WORDS, 3)
                row.append(Completion(tuple(ord(c) for c in " ".join(words))))
            rows.append(row)
        return rows

    def greedy(self, prompt_ids, max_tokens):
        return [Completion(tuple(ord(c) for c in REFERENCE)) for _ in prompt_ids]

    def sleep(self):
        self.log.append("sleep")

    def share_cores(self, sharing):
        self.log.append(f"share_cores {sharing}")


class LoggingTrainer:
    """Records every call; given the rollout and the epoch's number of chunks, a call for any chunk
    but the last returns only once the engine has been asked for the next one (or after a timeout, so
    a broken schedule fails instead of hanging)."""

    world_size = 1

    def __init__(self, log: list[str], rollout: SeededRollout | None = None, chunks: int = 0):
        self.log, self.rollout, self.chunks, self.calls, self.saw_next_sample = log, rollout, chunks, [], []

    def train_batches(self, global_batches, role_weights):
        chunk = len(self.calls)
        self.log.append(f"train {chunk}")
        self.calls.append(([e for b in global_batches for e in b], dict(role_weights)))
        if self.rollout is not None and chunk + 1 < self.chunks:
            with self.rollout.called:
                self.saw_next_sample.append(self.rollout.called.wait_for(lambda: len(self.rollout.calls) > chunk + 1,
                                                                         timeout=20))
        tokens = sum(len(e.input_ids) - e.answer_start for b in global_batches for e in b)
        roles = {e.role for b in global_batches for e in b}
        return {"loss": 1.0, "role_loss": {role: 1.0 for role in roles}, "role_tokens": {role: 1 for role in roles},
                "answer_tokens": tokens, "micro_steps": len(global_batches), "optimizer_steps": 1, "lr": 1e-3}

    def push_weights(self):
        self.log.append("push")
        return {}


def _cfg(**pmc):
    return from_mapping("unlearn", {
        "model": {"path": "unused"}, "run_dir": "unused", "seed": 7,
        "trainer": {"batch_size": 2, "max_length": 64},
        "sampling": {"num_samples": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8},
        "pmc": {"epochs": 2, "min_len": 0, "reference_max_tokens": 8, "chunk_questions": 4, **pmc}})


def _loop(cfg, rollout, trainer, refusals=()):
    retain = [TrainExample(input_ids=(1, 2, 3 + i), answer_start=1, role="retain") for i in range(5)]
    return PMCLoop(cfg, rollout, trainer, TextFormatter(), QUESTIONS, retain, refusals=refusals)


def test_an_epoch_samples_every_question_once_in_seeded_chunks_trained_in_order():
    log: list[str] = []
    rollout = SeededRollout(log)
    trainer = LoggingTrainer(log)
    history = _loop(_cfg(overlap=False), rollout, trainer).run()
    assert len(rollout.calls) == len(trainer.calls) == 6  # 10 questions in chunks of 4, 4, 2; two epochs
    epochs = [rollout.calls[:3], rollout.calls[3:]]
    for calls in epochs:
        assert [len(questions) for questions, _ in calls] == [4, 4, 2]
        assert sorted(q for questions, _ in calls for q in questions) == sorted(QUESTIONS)
        # one seed stream per position in the epoch's order: chunk k starts k * chunk * n further on
        assert [seed - calls[0][1] for _, seed in calls] == [0, 4 * 3, 8 * 3]
    assert [q for q, _ in epochs[0]] != [q for q, _ in epochs[1]]  # reshuffled every epoch
    # each chunk's winners, in the chunk's order, each paired with a retain example
    for (questions, _), (examples, _) in zip(rollout.calls, trainer.calls):
        forget = [e for e in examples if e.role == "forget"]
        assert ["".join(map(chr, e.input_ids[:e.answer_start - 1])) for e in forget] == questions
        assert [e.role for e in examples] == ["forget", "retain"] * len(questions)
    assert [r.extra["chunk_trained_questions"] for r in history] == [[4, 4, 2]] * 2
    # the same seed gives the same chunks and samples
    again = SeededRollout()
    _loop(_cfg(overlap=False), again, LoggingTrainer([])).run()
    assert again.calls == rollout.calls


def test_sequential_samples_every_chunk_before_training_and_overlap_samples_the_next_chunk_during_training():
    log: list[str] = []
    _loop(_cfg(overlap=False, epochs=1), SeededRollout(log), LoggingTrainer(log)).run()
    assert log == ["sample 0", "sample 1", "sample 2", "sleep", "train 0", "train 1", "train 2", "push"]

    log = []
    rollout = SeededRollout(log)
    trainer = LoggingTrainer(log, rollout, chunks=3)
    _loop(_cfg(overlap=True, epochs=1), rollout, trainer).run()
    # training chunks 0 and 1 saw the engine asked for the next chunk before they ended
    assert trainer.saw_next_sample == [True, True]
    assert log.index("sample 1") < log.index("train 1") and log.index("sample 2") < log.index("train 2")
    assert log[-1] == "push" and "sleep" not in log  # the engine is busy: it never sleeps while overlapping
    # on CPU the engine steps down to one thread for exactly the overlapped part, and back before the push
    assert log[0] == "share_cores True" and log[-2] == "share_cores False"
    assert [line for line in log if line.startswith("share_cores")] == ["share_cores True", "share_cores False"]


@pytest.mark.parametrize("variant", [
    {"fast": True, "epochs": 3},
    {"lambda_align": 0.5},
    {"selection": "bradley_terry", "bt_tau": 0.5, "restart_every": 1, "epochs": 3},
])
def test_overlap_changes_the_schedule_only(variant):
    from pmc_pipeline.method.alignment import load_refusals

    refusals = load_refusals() if variant.get("lambda_align") else ()
    runs = []
    for overlap in (False, True):
        trainer = LoggingTrainer([])
        loop = _loop(_cfg(overlap=overlap, **variant), SeededRollout(), trainer, refusals)
        history = loop.run()
        records = [{k: v for k, v in r.as_dict().items() if "seconds" not in k and k not in ("timeline", "overlap")}
                   for r in history]
        runs.append((records, trainer.calls, loop.state_dict()))
    assert runs[0] == runs[1]


def test_chunk_questions_must_be_whole_global_batches():
    with pytest.raises(ConfigError, match=r"pmc.chunk_questions=3 must be a multiple of trainer.batch_size x "
                                          r"trainer.world_size = 2"):
        _cfg(chunk_questions=3)
    cfg = from_mapping("unlearn", {"model": {"path": "unused"}, "run_dir": "unused",
                                   "trainer": {"batch_size": 2, "world_size": 2, "grad_accum": 3}})
    # default: about a quarter of the epoch, in whole optimizer steps (12 questions here)
    assert [cfg.chunk_size(q) for q in (5, 48, 49, 400)] == [12, 12, 24, 108]
