"""PMC's keep set (data.keep) on fake roles (no engine): questions whose answers must not change are
trained towards the *starting* model's own greedy answers, computed once, kept across restarts and in
the loop state, never towards a ground truth; and the input rules around it.
tests/test_config_reaches_roles.py runs a keep set on real engines."""

from __future__ import annotations

import json

import pytest

from pmc_pipeline.config import from_mapping
from pmc_pipeline.errors import PMCError
from pmc_pipeline.method.loop import PMCLoop
from pmc_pipeline.recipes.unlearn import check_unlearn
from trainer.records import TrainExample

from test_chunked_epoch import QUESTIONS, Completion, LoggingTrainer, SeededRollout, TextFormatter
from test_chunked_epoch import _cfg as chunked_cfg

KEEP = ["who wrote the keep book", "where is the keep city", "when was the keep war"]


class VersionedRollout(SeededRollout):
    """Greedy answers name the weights the engine holds: "version k" after k pushes."""

    def __init__(self):
        super().__init__()
        self.version, self.greedy_calls = 0, []

    def greedy(self, prompt_ids, max_tokens):
        self.greedy_calls.append(["".join(map(chr, p)) for p in prompt_ids])
        return [Completion(tuple(ord(c) for c in f"answer of version {self.version}")) for _ in prompt_ids]


class PushingTrainer(LoggingTrainer):
    def __init__(self, rollout: VersionedRollout):
        super().__init__([])
        self.engine = rollout

    def push_weights(self):
        self.engine.version += 1
        return {}


def _cfg(**pmc):
    """test_chunked_epoch's loop config: 3 epochs and a keep weight of 0.3 unless `pmc` says otherwise."""
    return chunked_cfg(**{"epochs": 3, "lambda_keep": 0.3, **pmc})


def _loop(cfg, rollout, trainer, keep=KEEP, keep_answers=()):
    retain = [TrainExample(input_ids=(1, 2, 3 + i), answer_start=1, role="retain") for i in range(5)]
    return PMCLoop(cfg, rollout, trainer, TextFormatter(), QUESTIONS, retain, keep_questions=keep,
                   keep_answers=keep_answers)


def _text(example: TrainExample) -> tuple[str, str]:
    text = "".join(map(chr, example.input_ids))
    return text[:example.answer_start - 1], text[example.answer_start:]


def test_keep_targets_are_the_starting_models_greedy_answers_through_restarts():
    rollout = VersionedRollout()
    trainer = PushingTrainer(rollout)
    loop = _loop(_cfg(restart_every=1), rollout, trainer)
    history = loop.run()
    assert len(loop.restarts) == 2 and loop.references[0] == "answer of version 2"  # references moved on
    assert rollout.greedy_calls[1] == KEEP  # the keep answers: asked once, right after the first references
    assert len([c for c in rollout.greedy_calls if c == KEEP]) == 1
    for examples, role_weights in trainer.calls:
        assert role_weights == {"forget": 1.0, "retain": 1.0, "keep": 0.3}
        keep = [_text(e) for e in examples if e.role == "keep"]
        assert keep and all(answer == "answer of version 0" for _, answer in keep)  # the starting model's
        assert {q for q, _ in keep} <= set(KEEP)
        # every forget winner is followed by a retain and a keep example (each rank gets all three roles)
        assert [e.role for e in examples] == ["forget", "retain", "keep"] * (len(examples) // 3)
    # over an epoch's 10 winners the 3 keep questions are each used (without replacement, reshuffled)
    first_epoch = [_text(e)[0] for examples, _ in trainer.calls[:3] for e in examples if e.role == "keep"]
    assert set(first_epoch) == set(KEEP) and len(first_epoch) == 10
    assert all(record.extra["loss_keep"] == 1.0 for record in history)  # the keep term's loss is logged
    assert loop.state_dict()["keep_answers"] == ["answer of version 0"] * 3


def test_a_resumed_loop_keeps_the_recorded_keep_answers_and_never_asks_the_engine_again():
    first = VersionedRollout()
    loop = _loop(_cfg(epochs=1), first, PushingTrainer(first))
    loop.run()
    state = json.loads(json.dumps(loop.state_dict()))  # as a checkpoint stores it
    rollout = VersionedRollout()
    rollout.version = 5  # the resumed engine holds trained weights
    trainer = PushingTrainer(rollout)
    resumed = _loop(_cfg(epochs=2), rollout, trainer)
    resumed.load_state_dict(state)
    resumed.run(start_epoch=2)
    assert rollout.greedy_calls == []
    assert {_text(e)[1] for examples, _ in trainer.calls for e in examples if e.role == "keep"} == {
        "answer of version 0"}


def test_an_empty_starting_answer_is_left_out_and_no_keep_set_changes_nothing():
    trainer = LoggingTrainer([])
    _loop(_cfg(epochs=1), SeededRollout(), trainer, keep=KEEP[:2], keep_answers=["kept answer", " "]).run()
    keep = {_text(e) for examples, _ in trainer.calls for e in examples if e.role == "keep"}
    assert keep == {(KEEP[0], "kept answer")}
    # without data.keep: the batches, role weights and loop state of a run before the keep set existed
    plain, keepless = LoggingTrainer([]), LoggingTrainer([])
    PMCLoop(_cfg(epochs=2), SeededRollout(), plain, TextFormatter(), QUESTIONS,
            [TrainExample(input_ids=(1, 2, 3 + i), answer_start=1, role="retain") for i in range(5)]).run()
    _loop(_cfg(epochs=2), SeededRollout(), keepless, keep=()).run()
    assert keepless.calls == plain.calls and all("keep" not in weights for _, weights in plain.calls)


def _unlearn_cfg(tmp_path, model, data_dir, keep, **top):
    return from_mapping("unlearn", {
        "model": {"path": str(model)}, "run_dir": str(tmp_path / "run"),
        "data": {"tofu_dir": str(data_dir), "forget": "forget", "retain": "retain", "keep": keep},
        "trainer": {"max_length": 128}, "rollout": {"max_model_len": 512}, **top})


def test_the_keep_file_gives_questions_only_and_its_rules_fail_in_one_line(tmp_path, tiny_model_dir, demo_data_dir):
    path = tmp_path / "keep.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "GROUND TRUTH"}) + "\n" for q in KEEP))
    inputs = check_unlearn(_unlearn_cfg(tmp_path, tiny_model_dir, demo_data_dir, str(path)))
    assert inputs.keep_questions == KEEP
    assert "GROUND TRUTH" not in json.dumps(inputs.__dict__, default=str)  # the answers are not read
    no_questions = tmp_path / "no-questions.jsonl"
    no_questions.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(PMCError) as missing:
        check_unlearn(_unlearn_cfg(tmp_path, tiny_model_dir, demo_data_dir, str(no_questions)))
    assert str(missing.value).startswith(f"data.keep {no_questions}") and "question" in str(missing.value)
    with pytest.raises(PMCError) as baseline:
        check_unlearn(_unlearn_cfg(tmp_path, tiny_model_dir, demo_data_dir, str(path), method="npo"))
    assert str(baseline.value) == f"data.keep={path}: the keep set is PMC's; method=npo does not read it"
    with pytest.raises(PMCError, match="data.keep: TOFU split 'no_such_split' not found"):
        check_unlearn(_unlearn_cfg(tmp_path, tiny_model_dir, demo_data_dir, "no_such_split"))


def test_drift_is_measured_against_the_references_and_the_starting_keep_answers_only():
    """Without ground truth: how much of the original answers the current greedy answers still hold."""
    rollout = VersionedRollout()
    loop = _loop(_cfg(epochs=1), rollout, PushingTrainer(rollout))
    loop.compute_references()
    loop.compute_keep_answers()
    assert loop.drift() == {"drift_reference_recall": 1.0, "drift_keep_recall": 1.0}  # nothing changed yet
    loop.run()  # one push: the greedy answers now say "version 1"
    drift = loop.drift()
    assert drift["drift_keep_recall"] == pytest.approx(3 / 4)  # "answer of version" of "answer of version 0"
    assert drift["drift_reference_recall"] == pytest.approx(3 / 4)
    keepless = _loop(_cfg(), VersionedRollout(), LoggingTrainer([]), keep=())
    keepless.compute_references()
    assert set(keepless.drift()) == {"drift_reference_recall"}
