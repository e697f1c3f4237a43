"""Bad input: a one-line error naming what is wrong, exit status 2, no traceback, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

PMC = [sys.executable, "-m", "pmc_pipeline.cli"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cli")
    (root / "forget.jsonl").write_text('{"question": "Who is Ada?"}\n')
    (root / "retain.jsonl").write_text('{"question": "Who is Bob?", "answer": "A baker."}\n')
    (root / "empty.jsonl").write_text("")
    (root / "noanswer.jsonl").write_text('{"question": "Who is Bob?", "reply": "A baker."}\n')
    return root


def run_pmc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(PMC + list(args), capture_output=True, text=True, timeout=300)


def base_args(workspace: Path, model: Path) -> list[str]:
    return ["unlearn", "unlearn/phi-1.5", f"model.path={model}", f"data.forget={workspace / 'forget.jsonl'}",
            f"data.retain={workspace / 'retain.jsonl'}", "model.dtype=float32"]


CASES = {
    "missing data file": (["data.forget={ws}/nothere.jsonl"], "data file not found: {ws}/nothere.jsonl"),
    "missing column": (["data.retain={ws}/noanswer.jsonl"], "column 'answer' not found"),
    "empty forget set": (["data.forget={ws}/empty.jsonl"], "empty"),
    "unknown config key": (["pmc.temperatur=1.0"], "unknown config key 'pmc.temperatur'"),
    "unknown config value": (["pmc.selection=best"], "pmc.selection='best' is not allowed"),
    "model path that does not exist": (["model.path={ws}/no-such-model"], "model.path not found: {ws}/no-such-model"),
    "missing config file": (None, "config file not found: nope.yaml"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_early_and_cleanly(case, workspace, tiny_model_dir):
    extra, expected = CASES[case]
    run_dir = workspace / f"run-{case.replace(' ', '-')}"
    if extra is None:
        args = ["unlearn", "nope.yaml"]
    else:
        args = base_args(workspace, tiny_model_dir) + [e.format(ws=workspace) for e in extra] + [f"run_dir={run_dir}"]
    result = run_pmc(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pmc unlearn: error: ")
    assert expected.format(ws=workspace) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not run_dir.exists()


def test_existing_run_dir_is_never_overwritten(workspace, tiny_model_dir):
    run_dir = workspace / "earlier-run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    result = run_pmc(*base_args(workspace, tiny_model_dir), f"run_dir={run_dir}")
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_finetune_reports_a_missing_model(workspace):
    result = run_pmc("finetune", "finetune/phi-1.5", f"model.path={workspace}/none", f"output_dir={workspace}/out")
    assert result.returncode == 2 and "model.path not found" in result.stderr
    assert not (workspace / "out").exists()
