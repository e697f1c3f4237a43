"""`make demo`'s code path end to end, on two real vLLM engines: it must print the README's table.

The README's table and token count come from `make demo` on one engine. The run here splits every
sampling batch over two engines started and placed by the demo's own session; since each piece of a
batch gets the seeds it would have had in one batch, the samples, and so every figure and the
generated-token count, must be the same as with one engine.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pmc_pipeline.recipes.demo import load_demo_config, run_demo

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(1)]
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_demo_figures() -> tuple[str, int]:
    """The tiny demo's before/after table (the README's first) and its generated-token count."""
    text = README.read_text()
    table = re.search(r"^\| metric \| fine-tuned \| PMC-unlearned \|\n(?:^\|.*\|\n)+", text, flags=re.M)
    tokens = re.search(r"PMC generated ([\d,]+) tokens in the 8\s+epochs", text)
    assert table and tokens, "README lacks the demo's table or token count"
    return table.group(0).strip(), int(tokens.group(1).replace(",", ""))


def test_demo_on_two_engines_prints_the_readme_table(tmp_path, ray_instance, kept_ranks, capsys, caplog):
    table, tokens = readme_demo_figures()
    cfg = load_demo_config("tiny", [f"workdir={tmp_path}", "unlearn.resources.rollout_engines=2"])
    with caplog.at_level(logging.INFO, logger="pmc_pipeline.runtime.session"):
        summary = run_demo(cfg, kept_ranks)  # the session's trainer ranks; its 2 engines are the demo's own
    assert "starting 2 vLLM rollout engine(s)" in caplog.text
    assert table in capsys.readouterr().out
    assert summary["generated_tokens"] == tokens
    run_config = OmegaConf.load(Path(summary["workdir"]) / "unlearn" / "config.yaml")
    assert run_config.resources.rollout_engines == 2
