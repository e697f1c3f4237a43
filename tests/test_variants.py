"""PMC variants as settings of the one loop, on scripted fake roles (no engine): PMC-alignment's
weight, PMC-fast's cache and skipping, restart. tests/test_variants_engines.py runs them for real."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pmc_pipeline.method.alignment import alignment_weight, load_refusals
from pmc_pipeline.method.fast_cache import BestAnswerCache
from pmc_pipeline.config import from_mapping
from pmc_pipeline.method.loop import PMCLoop
from pmc_pipeline.method.restart import RestartPolicy
from pmc_pipeline.schema import PMCConfig
from trainer.records import TrainExample

QUESTIONS = ["q0", "q1", "q2"]
REFERENCE = "alpha beta gamma delta epsilon"


@dataclass
class Completion:
    token_ids: tuple


def _encode(text: str) -> tuple:
    return tuple(ord(c) for c in text)


class TextFormatter:
    """Prompt ids = the question's characters; examples keep the texts readable for assertions."""

    def prompt_ids(self, question: str) -> list[int]:
        return list(_encode(question))

    def decode(self, token_ids) -> str:
        return "".join(chr(t) for t in token_ids)

    def example(self, question, answer, role, max_length=None) -> TrainExample:
        return TrainExample(input_ids=_encode(question + "|" + answer), answer_start=len(question) + 1, role=role)


class ScriptedRollout:
    """sample() answers from script[epoch][question] (n copies of each listed answer, cycled)."""

    def __init__(self, script, greedy_texts=None):
        self.script, self.epoch, self.sent = script, 0, []
        self.greedy_texts = greedy_texts or (lambda: REFERENCE)

    def sample(self, prompt_ids, n, temperature, top_p, max_tokens, seed=None):
        self.epoch += 1
        questions = ["".join(map(chr, p)) for p in prompt_ids]
        self.sent.append(questions)
        rows = []
        for q in questions:
            answers = self.script[self.epoch][q]
            rows.append([Completion(_encode(answers[i % len(answers)])) for i in range(n)])
        return rows

    def greedy(self, prompt_ids, max_tokens):
        text = self.greedy_texts()  # one answer text per call (the model's state)
        return [Completion(_encode(text)) for _ in prompt_ids]

    def sleep(self):
        pass

    def share_cores(self, sharing):
        pass


class RecordingTrainer:
    world_size = 1

    def __init__(self):
        self.calls = []

    def train_batches(self, global_batches, role_weights):
        self.calls.append(([e for b in global_batches for e in b], dict(role_weights)))
        roles = {e.role for b in global_batches for e in b}
        return {"loss": 1.0, "role_loss": {role: 1.0 for role in roles}, "role_tokens": {role: 1 for role in roles},
                "answer_tokens": len(roles), "micro_steps": len(global_batches), "optimizer_steps": 1, "lr": 1e-3}

    def push_weights(self):
        return {}


SECTION_OF = {"num_samples": "sampling", "temperature": "sampling", "top_p": "sampling", "max_tokens": "sampling",
              "batch_size": "trainer", "max_length": "trainer"}  # anything else: pmc


def _cfg(**changes):
    """An unlearn config with these keys set (by name, in their section) over a small base."""
    # one chunk per epoch (chunk_questions >= 3 questions): the script counts sample calls as epochs
    base = dict(epochs=3, num_samples=2, temperature=1.0, top_p=1.0, max_tokens=8, lambda_retain=1.0, min_len=0,
                batch_size=2, max_length=64, reference_max_tokens=8, chunk_questions=4)
    sections: dict[str, dict] = {"pmc": {}, "sampling": {}, "trainer": {}}
    for key, value in {**base, **changes}.items():
        sections[SECTION_OF.get(key, "pmc")][key] = value
    return from_mapping("unlearn", {"model": {"path": "unused"}, "run_dir": "unused", **sections})


def _loop(cfg, rollout, trainer=None, refusals=()):
    retain = [TrainExample(input_ids=(1, 2, 3), answer_start=1, role="retain")]
    return PMCLoop(cfg, rollout, trainer or RecordingTrainer(), TextFormatter(), QUESTIONS, retain, refusals=refusals)


def _answer_of(example: TrainExample) -> str:
    return "".join(map(chr, example.input_ids))[example.answer_start:]


# reward (1 - ROUGE-L recall vs REFERENCE, 5 tokens) of each scripted answer
HALF = "alpha beta zzz yyy xxx"          # 2/5 recall -> 0.6
FAR = "one two three four five"          # 0 recall -> 1.0
MOST = "alpha beta gamma delta qqq"      # 4/5 recall -> 0.2


def test_alignment_weight_falls_as_rewards_rise_and_is_zero_at_maximum():
    assert [alignment_weight(0.5, g) for g in (0.0, 0.4, 0.8, 1.0)] == pytest.approx([0.5, 0.3, 0.1, 0.0])
    script = {1: {q: [MOST] for q in QUESTIONS}, 2: {q: [HALF] for q in QUESTIONS}, 3: {q: [FAR] for q in QUESTIONS}}
    trainer, refusals = RecordingTrainer(), load_refusals()
    history = _loop(_cfg(lambda_align=0.5), ScriptedRollout(script), trainer, refusals).run()
    gammas = [r.extra["gamma"] for r in history]
    weights = [r.extra["align_weights"][0] for r in history]
    assert gammas == pytest.approx([0.2, 0.6, 1.0]) and weights == pytest.approx([0.4, 0.2, 0.0])
    assert len(trainer.calls) == 3
    # what the trainer got: the logged weight, and one (forget question, refusal) example per winner
    for (examples, role_weights), weight in zip(trainer.calls[:2], weights[:2]):
        assert role_weights["align"] == pytest.approx(weight)
        align = [e for e in examples if e.role == "align"]
        assert len(align) == len(QUESTIONS) and all(_answer_of(e) in refusals for e in align)
    examples, role_weights = trainer.calls[2]
    assert [e.role for e in examples].count("forget") == len(QUESTIONS)
    assert "align" not in role_weights and not any(e.role == "align" for e in examples)


def test_fast_cache_keeps_the_best_and_replaces_only_with_at_least_as_good():
    cache = BestAnswerCache(3)
    cache.update([0, 1, 2], ["a", "b", "c"], [0.5, 1.0, 0.0])
    assert cache.answers == ["a", "b", None]  # zero reward (the secret itself) is never cached
    cache.update([0], ["worse"], [0.4])
    assert cache.answers[0] == "a"
    cache.update([0], ["as good"], [0.5])
    assert cache.answers[0] == "as good"
    assert cache.to_sample() == [0, 2] and cache.converged() == 1
    cache.clear()
    assert cache.to_sample() == [0, 1, 2] and cache.cached() == []


def test_fast_stops_sampling_converged_questions_and_trains_on_the_cached_best():
    script = {
        1: {"q0": [FAR], "q1": [HALF], "q2": [MOST]},
        2: {"q1": [MOST], "q2": [HALF]},            # q1 gets worse: its epoch-1 answer stays
        3: {"q1": [FAR], "q2": [HALF]},             # q2 as good as before: replaced (same text here)
        4: {"q2": [FAR]},
    }
    rollout, trainer = ScriptedRollout(script), RecordingTrainer()
    history = _loop(_cfg(fast=True, epochs=4), rollout, trainer).run()
    assert [sorted(sent) for sent in rollout.sent] == [["q0", "q1", "q2"], ["q1", "q2"], ["q1", "q2"], ["q2"]]
    assert [r.prompts_sampled for r in history] == [3, 2, 2, 1]
    assert [r.extra["converged_questions"] for r in history] == [1, 1, 2, 3]
    tokens = [r.generated_tokens for r in history]
    assert tokens == sorted(tokens, reverse=True) and tokens[-1] < tokens[0]
    trained = [sorted(_answer_of(e) for e in examples if e.role == "forget") for examples, _ in trainer.calls]
    assert trained[1] == sorted([FAR, HALF, HALF])  # q0's cached FAR; q1 keeps HALF over the worse MOST
    assert trained[2] == sorted([FAR, FAR, HALF])
    assert trained[3] == [FAR] * 3
    assert [r.reward_mean for r in history] == pytest.approx([(1 + 0.6 + 0.2) / 3, 2.2 / 3, 2.6 / 3, 1.0])


def test_without_fast_every_question_is_sampled_every_epoch():
    script = {e: {q: [FAR] for q in QUESTIONS} for e in (1, 2, 3)}
    rollout = ScriptedRollout(script)
    _loop(_cfg(), rollout).run()
    assert [sorted(sent) for sent in rollout.sent] == [QUESTIONS] * 3


def _not_best_winners(trainer: RecordingTrainer) -> list[int]:
    """Per epoch: forget winners the trainer got that are not the best scripted answer (FAR)."""
    return [sum(_answer_of(e) != FAR for e in examples if e.role == "forget") for examples, _ in trainer.calls]


def test_selected_below_best_counts_the_winners_bradley_terry_drew_below_the_best():
    script = {e: {q: [MOST, HALF, FAR] for q in QUESTIONS} for e in (1, 2, 3)}  # FAR (reward 1) is each best
    argmax_trainer, bt_trainer = RecordingTrainer(), RecordingTrainer()
    argmax = _loop(_cfg(num_samples=3), ScriptedRollout(script), argmax_trainer).run()
    # tau 100: close to uniform over the 3 samples, so most winners are not the best one
    bt = _loop(_cfg(num_samples=3, selection="bradley_terry", bt_tau=100.0), ScriptedRollout(script),
               bt_trainer).run()
    assert [r.selected_below_best for r in argmax] == _not_best_winners(argmax_trainer) == [0, 0, 0]
    counts = [r.selected_below_best for r in bt]
    assert counts == _not_best_winners(bt_trainer) and len(counts) == 3 and sum(counts) > 0


def test_restart_every_k_replaces_the_references_with_the_current_greedy_answers():
    script = {e: {q: [HALF] for q in QUESTIONS} for e in (1, 2, 3)}
    greedy_answers = iter([REFERENCE, "the collapsed answer now"])
    loop = _loop(_cfg(restart_every=2), ScriptedRollout(script, lambda: next(greedy_answers)))
    history = loop.run()
    assert [r.extra.get("restart") for r in history] == [None, "every", None]
    assert loop.references == ["the collapsed answer now"] * 3 and loop.restarts == [2]
    # after the restart HALF is scored against the new reference (no overlap): reward 1
    assert history[1].reward_mean == pytest.approx(0.6) and history[2].reward_mean == pytest.approx(1.0)


def test_plateau_rule():
    policy = RestartPolicy(PMCConfig(restart_on_plateau=True, plateau_patience=2, plateau_eps=0.01))
    assert [policy.after_epoch(r) for r in (0.3, 0.5, 0.505, 0.51)] == [None, None, None, "plateau"]
    policy.reset()
    assert [policy.after_epoch(r) for r in (0.99, 1.0, 1.0, 1.0)] == [None, None, None, None]  # collapsed: done
    assert RestartPolicy(PMCConfig()).after_epoch(0.1) is None


@pytest.mark.parametrize("name,expected", [
    ("unlearn/phi-1.5-align", {"lambda_align": 0.5, "min_len": 5, "epochs": 40, "fast": False}),
    ("unlearn/llama-3.2-3b-align", {"lambda_align": 0.5, "min_len": 5, "epochs": 15, "fast": False}),
    ("unlearn/phi-1.5-fast", {"lambda_align": 0.0, "fast": True, "epochs": 40}),
    ("unlearn/llama-3.2-3b-fast", {"lambda_align": 0.0, "fast": True, "epochs": 30}),
])
def test_variant_configs_compose_on_the_unlearning_configs(name, expected):
    from pmc_pipeline.config import load_config
    from pmc_pipeline.method.alignment import refusals_for

    cfg = load_config("unlearn", name)
    assert {key: getattr(cfg.pmc, key) for key in expected} == expected
    assert len(refusals_for(cfg.pmc)) == (20 if expected["lambda_align"] else 0)


def test_demo_variants_are_selectable_by_name():
    from pmc_pipeline.recipes.demo import load_demo_config

    assert load_demo_config("tiny-align", []).unlearn["pmc"]["lambda_align"] > 0
    assert load_demo_config("tiny-fast", []).unlearn["pmc"]["fast"] is True


@pytest.mark.parametrize("override,message", [
    ("pmc.selection=softmax", "pmc.selection='softmax' is not allowed; choose one of: argmax, bradley_terry"),
    ("pmc.bt_tau=-0.1", "pmc.bt_tau=-0.1 is out of range"),
    ("pmc.lambda_align=-1", "pmc.lambda_align=-1.0 is out of range"),
    ("pmc.semantic_refusal_weight=1.5", "pmc.semantic_refusal_weight=1.5 is out of range"),
    ("pmc.restart_every=-2", "pmc.restart_every=-2 is out of range"),
    ("pmc.plateau_patience=0", "pmc.plateau_patience=0 is out of range"),
])
def test_bad_variant_settings_name_the_key(override, message):
    from pmc_pipeline.config import load_config
    from pmc_pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config("unlearn", "unlearn/phi-1.5", [override])
    assert message in str(info.value)


def test_a_missing_refusal_file_fails_before_any_engine_starts(tmp_path):
    from pmc_pipeline.config import load_config
    from pmc_pipeline.errors import ConfigError
    from pmc_pipeline.method.alignment import refusals_for

    cfg = load_config("unlearn", "unlearn/phi-1.5-align", [f"pmc.refusals_file={tmp_path / 'nope.txt'}"])
    with pytest.raises(ConfigError, match="pmc.refusals_file"):
        refusals_for(cfg.pmc)
