"""`pmc plot` on hand-made run dirs (no engine)."""

from __future__ import annotations

import json

import pytest

from pmc_pipeline.errors import PMCError
from pmc_pipeline.eval.plots import plot_runs, read_run


def _run(root, name, uq, with_before=True):
    run = root / name
    run.mkdir()
    lines = []
    for epoch, value in enumerate(uq, 1):
        line = {"epoch": epoch, "loss": 1.0, "elapsed_seconds": 10.0 * epoch}
        if value is not None:
            line.update({"eval_unlearn_quality": value, "eval_utility": 90 - value / 10})
        lines.append(json.dumps(line))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if with_before:
        (run / "eval_before.json").write_text(json.dumps({"eval_unlearn_quality": 30.0, "eval_utility": 95.0}))
    return run


def test_read_run_keeps_evaluated_epochs_and_epoch_zero(tmp_path):
    curve = read_run(_run(tmp_path, "a", [None, 50.0, None, 80.0]))
    assert curve.epochs == [0, 2, 4] and curve.seconds == [0.0, 20.0, 40.0]
    assert curve.unlearn_quality == [30.0, 50.0, 80.0] and curve.utility == [95.0, 85.0, 82.0]


def test_plots_for_several_runs_are_pngs(tmp_path):
    runs = [_run(tmp_path, "a", [40.0, 60.0]), _run(tmp_path, "b", [20.0, 90.0], with_before=False)]
    written = plot_runs(runs, tmp_path / "out")
    assert sorted(p.name for p in written) == ["curves_epoch.png", "curves_time.png", "pareto.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*"))  # no temp files left


def test_a_run_with_timelines_gets_its_timeline_even_without_evaluation_scores(tmp_path):
    run = tmp_path / "t"
    run.mkdir()
    timeline = [["rollout", 0.0, 1.0], ["reward", 1.0, 1.1], ["rollout", 1.1, 2.0], ["train", 1.1, 1.8],
                ["train", 2.0, 2.6], ["weight_push", 2.6, 2.7]]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "timeline": timeline}) + "\n" for e in (1, 2)))
    curve = read_run(run)
    assert [epoch for epoch, _ in curve.timelines] == [1, 2] and curve.timelines[0][1][3] == ("train", 1.1, 1.8)
    written = plot_runs([run], tmp_path / "out")
    assert [p.name for p in written] == ["timeline.png"] and written[0].read_bytes()[:4] == b"\x89PNG"
    # beside an evaluated run: the curves for the evaluated one, a timeline named after each run that has one
    written = plot_runs([run, _run(tmp_path, "a", [40.0])], tmp_path / "out2")
    assert sorted(p.name for p in written) == ["curves_epoch.png", "curves_time.png", "pareto.png", "timeline-t.png"]


def test_a_run_without_evaluation_scores_is_a_clear_error(tmp_path):
    with pytest.raises(PMCError, match="eval_every"):
        read_run(_run(tmp_path, "c", [None, None], with_before=False))


def test_an_existing_folder_is_refused_and_left_as_it_was(tmp_path):
    run = _run(tmp_path, "a", [40.0, 60.0])
    out = tmp_path / "figures"
    out.mkdir()
    (out / "mine.png").write_bytes(b"the user's figure")
    with pytest.raises(PMCError, match=r"out=.*figures already exists and is not empty; choose a new out"):
        plot_runs([run], out)
    assert [p.name for p in out.iterdir()] == ["mine.png"] and (out / "mine.png").read_bytes() == b"the user's figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "figures"]  # no temp folder left behind


def test_each_methods_front_spans_its_trials_and_the_overall_front_all_of_them(tmp_path):
    """The paper's Figure 3 view of a tofu-real benchmark: PMC's two trials form one front, GA's its own."""
    from pmc_pipeline.eval.plots import draw_method_comparison
    from pmc_pipeline.recipes.tofu_real_report import curves_start, epoch_fronts

    def curve(*points):
        return [{"epoch": 0, "eval_unlearn_quality": 20.0, "eval_utility": 90.0}] + [
            {"epoch": e, "eval_unlearn_quality": q, "eval_utility": u} for e, q, u in points]

    curves = {"pmc": curve((4, 60.0, 85.0), (8, 80.0, 70.0)), "pmc-lr": curve((4, 50.0, 88.0), (8, 70.0, 60.0)),
              "ga": curve((5, 90.0, 40.0), (10, 75.0, 80.0))}
    fronts = epoch_fronts(curves, {"pmc": "pmc", "pmc-lr": "pmc", "ga": "ga"})
    marks = {(p["trial"], p["epoch"]): (p["method"], p["method_front"], p["overall_front"]) for p in fronts}
    assert marks == {  # pmc-lr epoch 8 (70, 60) is below pmc epoch 8 (80, 70); no other point is dominated
        ("pmc", 4): ("pmc", True, True), ("pmc", 8): ("pmc", True, True),
        ("pmc-lr", 4): ("pmc", True, True), ("pmc-lr", 8): ("pmc", False, False),
        ("ga", 5): ("ga", True, True), ("ga", 10): ("ga", True, True)}
    # a ga point above and right of pmc's epoch 8 takes it off the overall front, not off pmc's own
    curves["ga"].append({"epoch": 15, "eval_unlearn_quality": 85.0, "eval_utility": 75.0})
    again = {(p["trial"], p["epoch"]): (p["method_front"], p["overall_front"])
             for p in epoch_fronts(curves, {"pmc": "pmc", "pmc-lr": "pmc", "ga": "ga"})}
    assert again[("pmc", 8)] == (True, False) and again[("ga", 15)] == (True, True)
    assert curves_start(curves) == (20.0, 90.0)
    path = tmp_path / "comparison.png"
    draw_method_comparison(fronts, (20.0, 90.0), {"finetuned": (0.9, 0.95), "pmc": (0.1, None)}, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
