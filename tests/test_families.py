"""Every shipped model family runs for real, shrunk to CPU size, through the commands users type.

For each family: `pmc make-tiny` checkpoint -> `pmc finetune finetune/<family>` -> `pmc unlearn
unlearn/<family>` -> `pmc evaluate <run dir>`, each a separate process connected to the session's Ray
(RAY_ADDRESS), starting and placing its own engines and trainer ranks as a user's run does. The shipped
config files are used as they are, with only these overrides:

- shrinking: data.tofu_dir (a copy of a few TOFU rows per split, under the split names the configs use),
  epochs / pmc.epochs, trainer.batch_size, sampling.num_samples and the max_tokens keys, attack.k,
  trainer.world_size=2, resources.rollout_engines=2, resources.use_gpus=false, output paths;
  trainer.torch_threads=1 (2 cores shared by 4 actors);
Kept: the configs' dtype (bfloat16: DeepSpeed-CPU and vLLM-CPU both run it), grad_accum, gradient
checkpointing, max_length, prompt format and system prompt, sampling temperature / top-p, lambda,
learning rate.

Then: the saved (bf16) checkpoint loads in the family's HF auto class, and a fresh float32 engine on
it answers the forget questions greedily token for token as HF `generate` does in float32 (bf16 has
no such parity on vLLM-CPU: 12/16 in docs/platform.md; bf16 weights upcast to float32 exactly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pmc_pipeline.models.families import make_tiny_family

pytestmark = pytest.mark.engines

REPO = Path(__file__).resolve().parent.parent
ROWS = {"forget10": 4, "forget10_perturbed": 4, "retain90": 4, "world_facts": 2, "world_facts_perturbed": 2,
        "real_authors": 2, "real_authors_perturbed": 2}
CPU = ["resources.use_gpus=false", "trainer.torch_threads=1"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def few_rows_tofu(tmp_path_factory, tofu_dir) -> Path:
    """A few rows of each TOFU split the shipped configs name (full = forget + retain rows)."""
    out = tmp_path_factory.mktemp("tofu-few")
    for split, n in ROWS.items():
        lines = (tofu_dir / f"{split}.json").read_text(encoding="utf-8").splitlines()[:n]
        (out / f"{split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    full = (out / "forget10.json").read_text() + (out / "retain90.json").read_text()
    (out / "full.json").write_text(full, encoding="utf-8")
    return out


def pmc(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m pmc_pipeline.cli ...` as a user types it, on the session's Ray."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pmc_pipeline.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    print(f"\npmc {args[0]} {args[1]}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s")
    print("\n".join(line for line in proc.stderr.splitlines() if " INFO pmc_pipeline." in line))
    return proc


def tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout[-1500:] + "\n---\n" + proc.stderr[-4000:])


def finetune(family: str, config: str, base: Path, out: Path, data: Path) -> None:
    proc = pmc("finetune", f"finetune/{config}", f"model.path={base}", f"output_dir={out}", f"data.tofu_dir={data}",
               "epochs=1", "trainer.batch_size=2", "trainer.world_size=2", *CPU)
    assert proc.returncode == 0, tail(proc)


def unlearn_args(config: str, model: Path, run_dir: Path, data: Path) -> list[str]:
    return ["unlearn", f"unlearn/{config}", f"model.path={model}", f"run_dir={run_dir}", f"data.tofu_dir={data}",
            "pmc.epochs=2", "trainer.batch_size=2", "trainer.world_size=2", "resources.rollout_engines=2",
            "sampling.num_samples=2", f"sampling.max_tokens={MAX_TOKENS}", f"pmc.reference_max_tokens={MAX_TOKENS}",
            f"evaluation.max_tokens={MAX_TOKENS}", *CPU]


def evaluate(run_dir: Path, out: Path, tmp: Path) -> dict:
    text = tmp / "unrelated.txt"
    text.write_text("The weather report mentioned the city twice before noon. " * 8)
    proc = pmc("evaluate", str(run_dir), "attack.k=2", f"attack.max_tokens={MAX_TOKENS}",
               f"evaluation.max_tokens={MAX_TOKENS}", f"output_dir={out}", f"probes.side_effect_text={text}")
    assert proc.returncode == 0, tail(proc)
    return json.loads((out / "eval.json").read_text())


def greedy_parity(checkpoint: Path, config: str, ray_instance) -> tuple[list, list]:
    """The forget questions' greedy answers: a fresh engine on `checkpoint` vs HF generate (float32)."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from pmc_pipeline.data.prompts import PromptFormatter
    from pmc_pipeline.models.source import load_tokenizer
    from rollout.actor import start_rollout_actor, stop_rollout_actor, wait_until_ready
    from rollout.config import RolloutConfig

    shipped = OmegaConf.load(REPO / "configs" / "unlearn" / f"{config}.yaml")
    tokenizer = load_tokenizer(str(checkpoint))
    formatter = PromptFormatter(tokenizer, shipped.model.prompt_format, shipped.model.get("system_prompt"))
    questions = [json.loads(line)["question"] for line in
                 (REPO.parent / "shared/data/tofu/forget10.json").read_text().splitlines()[:ROWS["forget10"]]]
    prompts = [formatter.prompt_ids(q) for q in questions]
    actor = start_rollout_actor(RolloutConfig(max_model_len=1024), str(checkpoint), "float32", 0, use_gpus=False,
                                transfer_backend="gloo")
    try:
        wait_until_ready(actor)
        engine = [list(c.token_ids) for c in ray_instance.get(actor.greedy.remote(prompts, MAX_TOKENS))]
    finally:
        stop_rollout_actor(actor)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hf = []
    for ids in prompts:
        with torch.no_grad():  # HF's defaults: stops on every eos id of generation_config, as the engine does
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        hf.append(out[0, len(ids):].tolist())
    return engine, hf


def stored_dtype(checkpoint: Path) -> torch.dtype:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert len(dtypes) == 1, dtypes
    return dtypes.pop()


def run_family(family, config, tmp_path, few_rows_tofu, ray_instance, auto_class):
    base = make_tiny_family(family, tmp_path / "base")
    finetuned = tmp_path / "finetuned"
    finetune(family, config, base, finetuned, few_rows_tofu)
    # trained with gradient checkpointing (llama), saved for generation: the KV cache stays on
    assert json.loads((finetuned / "config.json").read_text())["use_cache"] is True
    run_dir = tmp_path / "run"
    proc = pmc(*unlearn_args(config, finetuned, run_dir, few_rows_tofu))
    assert proc.returncode == 0, tail(proc)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    results = evaluate(run_dir, tmp_path / "eval", tmp_path)
    assert results["forget"] is not None and results["sampling_attack"]["k"] == 2
    checkpoint = run_dir / "checkpoint-final"
    assert stored_dtype(checkpoint) == torch.bfloat16  # the configs' dtype, kept
    model = auto_class.from_pretrained(checkpoint, dtype=torch.float32)
    engine, hf = greedy_parity(checkpoint, config, ray_instance)
    print(f"greedy answers (engine = HF): {engine}")
    assert engine == hf
    # not a degenerate model (e.g. one token repeated): parity over varied tokens
    assert len({token for answer in engine for token in answer}) > MAX_TOKENS
    return model


def test_llama_3_2_finetune_unlearn_evaluate(tmp_path, few_rows_tofu, ray_instance):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = run_family("llama-3.2", "llama-3.2-3b", tmp_path, few_rows_tofu, ray_instance, AutoModelForCausalLM)
    assert type(model) is LlamaForCausalLM and model.config.tie_word_embeddings


def test_phi_1_5_finetune_unlearn_evaluate(tmp_path, few_rows_tofu, ray_instance):
    from transformers import AutoModelForCausalLM, PhiForCausalLM

    model = run_family("phi-1.5", "phi-1.5", tmp_path, few_rows_tofu, ray_instance, AutoModelForCausalLM)
    assert type(model) is PhiForCausalLM


def test_gemma_3_finetune_keeps_the_vision_tower_and_unlearn_names_what_vllm_cpu_lacks(
        tmp_path, few_rows_tofu, ray_instance):
    """Fine-tuning runs for real (ZeRO-3, world 2) and leaves the vision tower bit-identical.

    `pmc unlearn` cannot run Gemma-3 multimodal on this CPU install: vLLM's gemma3_mm module imports
    transformers' Gemma3ImageProcessor, which needs torchvision, and only CUDA builds of torchvision
    exist for this torch (installed, they break transformers: docs/platform.md). The up-front check
    says so in one line, before any run dir is made."""
    from transformers import AutoModelForImageTextToText, Gemma3ForConditionalGeneration

    base = make_tiny_family("gemma-3", tmp_path / "base")
    finetuned = tmp_path / "finetuned"
    finetune("gemma-3", "gemma-3-12b", base, finetuned, few_rows_tofu)
    model = AutoModelForImageTextToText.from_pretrained(finetuned, dtype=torch.float32)
    assert type(model) is Gemma3ForConditionalGeneration
    original = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    # compared as loaded: the trainer's save writes the vision tower as vision_tower.vision_model.*
    # (the hub's layout), transformers' own save of the base as vision_tower.*; both load the same model
    # the config trains and saves in bfloat16 and the tiny base is float32: "unchanged" is the base's
    # weights in the saved dtype (a bf16 base, as google/gemma-3-12b-it is, would compare as it is)
    saved = stored_dtype(finetuned)
    assert saved == torch.bfloat16
    for part in ("vision_tower", "multi_modal_projector"):
        before, after = getattr(original.model, part).state_dict(), getattr(model.model, part).state_dict()
        assert before.keys() == after.keys() and len(before) > 0
        assert all(torch.equal(before[k].to(saved).float(), after[k]) for k in before), part
    lm_before, lm_after = original.model.language_model.state_dict(), model.model.language_model.state_dict()
    # the language model did train
    assert any(not torch.equal(lm_before[k].to(saved).float(), lm_after[k]) for k in lm_before)
    assert (finetuned / "processor_config.json").is_file()  # what vLLM's multimodal engine starts from
    run_dir = tmp_path / "run"
    proc = pmc(*unlearn_args("gemma-3-12b", finetuned, run_dir, few_rows_tofu))
    assert proc.returncode == 2, tail(proc)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"pmc unlearn: error: model.path {finetuned}: vLLM 0.32.0 cannot load Gemma3ForConditionalGeneration in "
        f"this install (No module named 'torchvision'); the rollout engine needs it")
    assert not run_dir.exists()
