"""`pmc check`: validation, placement and per-GPU memory estimate, without starting anything."""

from __future__ import annotations

import json

import pytest

from pmc_pipeline.cli import main
from pmc_pipeline.recipes.check import GIB, KNOWN_ARCHITECTURES, architecture_from_config_json, check_config


def test_gemma_config_prints_placement_and_memory(capsys):
    assert main(["check", "unlearn/gemma-3-12b"]) == 0
    out = capsys.readouterr().out
    assert "(unlearn), valid" in out
    assert "placement: separate" in out and "8 GPU(s) in total" in out
    assert "rollout engine 3:" in out and "trainer rank 3: ZeRO-3 shard 1/4" in out
    assert "known-architecture table: google/gemma-3-12b-it" in out
    assert "engine model implementation: auto: vLLM's own module for the architecture where it loads" in out
    assert main(["check", "unlearn/gemma-3-12b", "rollout.model_impl=transformers"]) == 0
    assert "engine model implementation: transformers: vLLM's Transformers backend" in capsys.readouterr().out
    # the trainer line follows from the parameter count: bf16 weights + gradients + 12-byte AdamW states, / 4 ranks
    arch = next(a for names, a in KNOWN_ARCHITECTURES.items() if "gemma-3-12b" in names)
    per_rank = arch.params * (2 + 2 + 12) / 4 / GIB
    assert f"trainer rank GPU (x4): {per_rank:.1f} of 80" in out


def test_param_count_of_a_local_config_matches_the_real_model(tiny_model_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = architecture_from_config_json(tiny_model_dir / "config.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    real = sum(p.numel() for p in model.parameters())
    assert abs(arch.params - real) / real < 0.01  # only norms are left out


def test_a_config_that_cannot_fit_fails_after_printing(capsys):
    assert main(["check", "unlearn/llama-3.2-3b-1gpu", "resources.gpu_memory_gib=40"]) == 2
    captured = capsys.readouterr()
    assert "does not fit" in captured.out
    assert captured.err.count("\n") == 1 and "resources.gpu_memory_gib=40" in captured.err


def test_bad_placement_is_a_one_line_config_error(capsys):
    assert main(["check", "unlearn/llama-3.2-3b-1gpu", "rollout.tensor_parallel_size=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmc check: error:") and "rollout.tensor_parallel_size" in err


def test_finetune_configs_are_recognised_and_unknown_models_get_no_estimate(tmp_path):
    lines, problems = check_config("finetune/phi-1.5-8gpu")
    assert "(finetune), valid" in lines[0] and not any("rollout engine" in line for line in lines)
    assert sum("trainer rank" in line and "ZeRO-3 shard 1/8" in line for line in lines) == 8
    config = tmp_path / "other.yaml"
    config.write_text(json.dumps({"model": {"path": "someone/unknown-model"}, "run_dir": str(tmp_path / "r")}))
    lines, problems = check_config(str(config))
    assert lines[-1].startswith("memory: no estimate") and problems == []


@pytest.mark.parametrize("name", ["unlearn/gemma-3-12b", "finetune/gemma-3-12b", "unlearn/llama-3.2-3b-1gpu",
                                  "unlearn/llama-3.2-3b-8gpu", "unlearn/phi-1.5-1gpu", "unlearn/phi-1.5-8gpu",
                                  "finetune/llama-3.2-3b-1gpu", "finetune/llama-3.2-3b-8gpu",
                                  "finetune/phi-1.5-1gpu", "finetune/phi-1.5-8gpu"])
def test_every_shipped_scale_config_fits_its_gpus(name):
    lines, problems = check_config(name)
    assert problems == [], problems
    gpus = int(next(line for line in lines if line.startswith("placement:")).split(" GPU(s)")[0].split()[-1])
    assert gpus == (1 if name.endswith("1gpu") else 8)


@pytest.mark.parametrize("config, backend, group", [
    ("unlearn/llama-3.2-3b-8gpu", "nccl", ["rank 1: rollout engine 0", "rank 4: rollout engine 3"]),
    ("unlearn/llama-3.2-3b-1gpu", "ipc", ["rank 1: rollout engine 0"]),
    ("unlearn/llama-3.2-3b-8gpu rollout.tensor_parallel_size=2", "nccl", ["ranks 1-2: rollout engine 0",
                                                                          "ranks 7-8: rollout engine 3"]),
])
def test_check_prints_the_weight_push_group_of_separate_and_colocated_gpu_configs(config, backend, group):
    name, *overrides = config.split()
    lines, _ = check_config(name, overrides)
    push = [line for line in lines if line.startswith("weight push:")]
    size = 1 + int(group[-1].split(":")[0].split("-")[-1].split()[-1])
    assert push and f"backend {backend}, group of {size};" in push[0]
    assert "  rank 0: trainer rank 0 (sends; the other trainer ranks only join the ZeRO-3 gathers)" in lines
    assert all(f"  {entry} (tensor-parallel workers)" in lines if entry.startswith("ranks") else f"  {entry}" in lines
               for entry in group)


@pytest.mark.parametrize("config", ["unlearn/gemma-3-12b", "unlearn/llama-3.2-3b-8gpu"])
def test_check_prints_what_the_once_computed_reference_saves(config):
    """NPO and DPO: a frozen copy's ZeRO-3 shard (params x dtype bytes / ranks) is not held; PMC and SimNPO
    hold no reference either way, so no line."""
    lines, _ = check_config(config, ["method=npo", "evaluation.eval_every=0"])
    reference = [line for line in lines if "reference model (npo)" in line]
    params = float(next(line for line in lines if line.startswith("memory per GPU")).split("; ")[1].split(" B ")[0])
    cfg_lines, _ = check_config(config)
    dtype_bytes = 2  # these configs train in bf16
    ranks = int(next(line for line in lines if line.lstrip().startswith("trainer rank") and "(x" in line
                     ).split("(x")[1].split(")")[0])
    assert len(reference) == 1
    # trained without sampling and not evaluated during the run: no engine is placed
    assert not any(line.lstrip().startswith("rollout engine") for line in lines)
    assert any(line.lstrip().startswith("rollout engine") for line in cfg_lines)
    assert f"{params * 1e9 * dtype_bytes / ranks / GIB:.1f} GiB less per trainer rank" in reference[0]
    assert not any("reference model" in line for line in cfg_lines)
    assert not any("reference model" in line for line in check_config(config, ["method=simnpo"])[0])


def test_the_kl_retain_term_adds_the_frozen_starting_models_shard():
    nll, _ = check_config("unlearn/llama-3.2-3b-8gpu")
    kl, _ = check_config("unlearn/llama-3.2-3b-8gpu", ["retain_loss=kl"])
    trainer = [line for line in kl if line.lstrip().startswith("trainer rank GPU")]
    assert len(trainer) == 1 and "starting model for the KL (shard) 1.5" in trainer[0]
    assert not any("starting model for the KL" in line for line in nll)
    before = float(next(line for line in nll if line.lstrip().startswith("trainer rank GPU")).split(": ")[1].split()[0])
    assert float(trainer[0].split(": ")[1].split()[0]) == pytest.approx(before + 1.5, abs=0.11)
