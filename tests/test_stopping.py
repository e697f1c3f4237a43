"""PMC's stopping rule (pmc.stop_at_reference_recall, pmc.stop_below_keep_recall): its thresholds, the
loop ending after the epoch the rule names, and the settings it refuses. test_evaluation_engine.py runs
it on the real engine through `run_unlearning`."""

from __future__ import annotations

import pytest

from pmc_pipeline.errors import PMCError
from pmc_pipeline.method.stopping import StoppingRule
from pmc_pipeline.recipes.unlearn import check_unlearn

from test_keep_set import KEEP, PushingTrainer, VersionedRollout, _cfg, _loop, _unlearn_cfg


def test_each_threshold_stops_only_where_it_says_and_unevaluated_epochs_never_stop():
    reference = StoppingRule(reference_recall_at_most=0.4)
    assert reference.reason({"drift_reference_recall": 0.41}) is None
    assert reference.reason({"drift_reference_recall": 0.4}) == \
        "drift_reference_recall 0.4000 <= pmc.stop_at_reference_recall 0.4"  # at most: the threshold itself stops
    assert reference.reason({"drift_keep_recall": 0.0}) is None  # the keep figure is not its rule
    keep = StoppingRule(keep_recall_below=0.9)
    assert keep.reason({"drift_reference_recall": 0.0, "drift_keep_recall": 0.9}) is None  # below: 0.9 goes on
    assert keep.reason({"drift_reference_recall": 0.0, "drift_keep_recall": 0.89}) == \
        "drift_keep_recall 0.8900 < pmc.stop_below_keep_recall 0.9"
    assert reference.reason({"loss": 1.0}) is None and keep.reason({}) is None  # an epoch that was not evaluated
    assert not StoppingRule().active and StoppingRule().reason({"drift_reference_recall": 0.0}) is None
    assert reference.active and keep.active


@pytest.mark.parametrize("threshold,epochs_run", [(0.75, 2), (0.7, 4)])
def test_the_loop_ends_after_the_first_evaluated_epoch_the_rule_holds_at(threshold, epochs_run):
    """VersionedRollout's greedy answers say "answer of version k" after k pushes: from the first epoch on,
    the drift from the references ("... version 0") is 3/4. Evaluated every 2nd epoch (as eval_every=2)."""
    rollout = VersionedRollout()
    trainer = PushingTrainer(rollout)
    loop = _loop(_cfg(epochs=4), rollout, trainer)
    rule = StoppingRule(reference_recall_at_most=threshold)
    seen = []

    def on_epoch(record):
        fields = loop.drift() if record.epoch % 2 == 0 else {}
        seen.append(fields)
        return rule.reason(fields)

    history = loop.run(on_epoch)
    assert [r.epoch for r in history] == list(range(1, epochs_run + 1))
    assert rollout.version == epochs_run  # no training after the stop: one push per epoch trained
    assert seen[1] == {"drift_reference_recall": pytest.approx(0.75), "drift_keep_recall": pytest.approx(0.75)}


def test_the_rule_refuses_what_it_cannot_watch_in_one_line(tmp_path, tiny_model_dir, demo_data_dir):
    def refused(keep=None, **top):
        with pytest.raises(PMCError) as exc:
            check_unlearn(_unlearn_cfg(tmp_path, tiny_model_dir, demo_data_dir, keep, **top))
        return str(exc.value)

    evaluated = {"evaluation": {"eval_every": 2, "retain_split_for_eval": "retain"}}
    assert refused(pmc={"stop_at_reference_recall": 0.3}) == (
        "pmc.stop_at_reference_recall: the stopping rule is checked at evaluated epochs; set evaluation.eval_every > 0")
    assert refused(pmc={"stop_below_keep_recall": 0.8}, **evaluated) == (
        "pmc.stop_below_keep_recall: the keep answers' drift needs a keep set; set data.keep")
    assert refused(method="npo", pmc={"stop_at_reference_recall": 0.3}, **evaluated).startswith(
        "pmc.stop_at_reference_recall: the stopping rule watches PMC's drift from its references; method=npo has none")
    assert "a restart makes the current answers the new references" in refused(
        pmc={"stop_at_reference_recall": 0.3, "restart_every": 2}, **evaluated)
    keep = tmp_path / "keep.jsonl"
    keep.write_text("".join(f'{{"question": "{q}"}}\n' for q in KEEP))
    inputs = check_unlearn(_unlearn_cfg(tmp_path, tiny_model_dir, demo_data_dir, str(keep),
                                        pmc={"stop_below_keep_recall": 0.8}, **evaluated))
    assert inputs.keep_questions == KEEP  # with a keep set and evaluation the rule is accepted
