"""Every shipped model family runs for real, shrunk to CPU size, through the shipped configs.

For each family: `pmc make-tiny` checkpoint -> finetune `finetune/<family>` -> unlearn `unlearn/<family>`
-> evaluate the run dir, each config loaded from its shipped file and `key=value` overrides by the
loader the command line uses (`load_config`, `load_evaluate_config`), and the three recipes run in one
session of the test process, as `pmc demo` and `pmc tofu-real` chain them: the session places 2 trainer
ranks and 2 vLLM engines as `pmc unlearn` places them (the trainer ranks are the test session's kept
ones, as a `pmc` session keeps them between its jobs; the evaluation loads the unlearned checkpoint
into the running engines). The command line itself (parsing,
one-line errors, signals, a command starting its own engines) is what tests/test_bad_inputs.py,
test_faults_and_resume.py, test_sweep.py and test_ray_job.py run. The shipped config files are used as
they are, with only these overrides:

- shrinking: data.tofu_dir (a copy of a few TOFU rows per split, under the split names the configs use),
  epochs / pmc.epochs, trainer.batch_size, sampling.num_samples and the max_tokens keys, attack.k,
  trainer.world_size=2, resources.rollout_engines=2, resources.use_gpus=false, output paths;
  trainer.torch_threads=1 (2 cores shared by 4 actors); for Llama-3.2 and Phi-1.5 model.dtype=float32.
Kept: grad_accum, gradient checkpointing, max_length, prompt format and system prompt, sampling
temperature / top-p, lambda, learning rate; Gemma-3 keeps the configs' dtype too (bfloat16:
DeepSpeed-CPU and vLLM-CPU both run it). Llama and Phi run in float32 because bf16 is emulated on
CPUs without AVX-512 BF16: one forward and backward of the tiny Llama-3.2 (128,256-token vocabulary,
2 x 160 tokens, one thread) took 8.1 s in bf16 and 0.8 s in float32 on the suite's AVX2 machine, and
float32 gives greedy parity (bf16 has none on vLLM-CPU: 12/16 in docs/platform.md).

Then: the saved checkpoint loads in the family's HF auto class, and the run's own engines (started on
the fine-tuned folder the trainer saved, as `pmc unlearn` starts them) answer the forget and retain
questions greedily token for token as HF `generate` does in float32, after loading the unlearned
checkpoint and then the base. Gemma-3 shows it on its running engines in float32 instead: the
checkpoint loaded into them, then after each of two float32 pushes (`float32_pushes`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from pmc_pipeline.config import load_config
from pmc_pipeline.errors import PMCError
from pmc_pipeline.models.families import make_tiny_family
from pmc_pipeline.recipes.evaluate import load_evaluate_config, run_evaluation
from pmc_pipeline.recipes.finetune import run_finetune
from pmc_pipeline.recipes.roles import open_session
from pmc_pipeline.recipes.unlearn import check_unlearn, run_unlearning

pytestmark = [pytest.mark.engines, pytest.mark.trainer_world(2)]

REPO = Path(__file__).resolve().parent.parent
ROWS = {"forget10": 4, "forget10_perturbed": 4, "retain90": 4, "world_facts": 2, "world_facts_perturbed": 2,
        "real_authors": 2, "real_authors_perturbed": 2}
CPU = ["resources.use_gpus=false", "trainer.torch_threads=1"]
MAX_TOKENS = 16
FLOAT32 = "model.dtype=float32"  # Llama and Phi: see the module's docstring


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


def finetune_config(config: str, base: Path, out: Path, data: Path, *overrides: str):
    return load_config("finetune", f"finetune/{config}", [
        f"model.path={base}", f"output_dir={out}", f"data.tofu_dir={data}", "epochs=1", "trainer.batch_size=2",
        "trainer.world_size=2", *CPU, *overrides])


def unlearn_config(config: str, model: Path, run_dir: Path, data: Path, *overrides: str):
    return load_config("unlearn", f"unlearn/{config}", [
        f"model.path={model}", f"run_dir={run_dir}", f"data.tofu_dir={data}", "pmc.epochs=2", "trainer.batch_size=2",
        "trainer.world_size=2", "resources.rollout_engines=2", "sampling.num_samples=2",
        f"sampling.max_tokens={MAX_TOKENS}", f"pmc.reference_max_tokens={MAX_TOKENS}",
        f"evaluation.max_tokens={MAX_TOKENS}", *CPU, *overrides])


def evaluate_config(run_dir: Path, out: Path, tmp: Path):
    text = tmp / "unrelated.txt"
    text.write_text("The weather report mentioned the city twice before noon. " * 8)
    return load_evaluate_config(str(run_dir), ["attack.k=2", f"attack.max_tokens={MAX_TOKENS}",
                                               f"evaluation.max_tokens={MAX_TOKENS}", f"output_dir={out}",
                                               f"probes.side_effect_text={text}"])


def timed(stage: str, job, *args):
    start = time.perf_counter()
    result = job(*args)
    print(f"\n{stage}: {time.perf_counter() - start:.0f} s")
    return result


def greedy_parity(session, unlearn, config: str, auto_class, folders: list[Path]) -> list[list[int]]:
    """The forget and retain questions' greedy answers of each of the session's running engines (the
    unlearning's float32 engines, started on its model.path) and of HF generate with `auto_class`
    (float32), after loading each of `folders` into the engines in turn, as evaluation loads a run's
    checkpoint and base; asserts they are equal. The engines' answers."""
    import ray
    from omegaconf import OmegaConf

    from pmc_pipeline.data.prompts import DEFAULT_CHAT_DATE, PromptFormatter
    from pmc_pipeline.models.source import load_tokenizer

    from hf_reference import hf_greedy

    shipped = OmegaConf.load(REPO / "configs" / "unlearn" / f"{config}.yaml")
    formatter = PromptFormatter(load_tokenizer(str(folders[0])), shipped.model.prompt_format, shipped.model.get("system_prompt"),
                                shipped.model.get("chat_date", DEFAULT_CHAT_DATE))
    questions = [json.loads(line)["question"] for split in ("forget10", "retain90") for line in
                 (REPO.parent / f"shared/data/tofu/{split}.json").read_text().splitlines()[:ROWS[split]]]
    prompts = [formatter.prompt_ids(q) for q in questions]
    seen = []
    for folder in folders:
        rollout = session.rollout(str(folder), unlearn.rollout, unlearn.model.dtype, unlearn.seed)
        started_on = {ray.get(actor.effective_settings.remote())["model_path"] for actor in rollout.actors}
        assert started_on == {unlearn.model.path}  # the run's engines, loaded (not new engines on `folder`)
        expected = [list(a) for a in hf_greedy(auto_class.from_pretrained(folder, dtype=torch.float32).eval(),
                                                  prompts, MAX_TOKENS)]
        for engine, actor in enumerate(rollout.actors):
            answers = [list(c.token_ids) for c in ray.get(actor.greedy.remote(prompts, MAX_TOKENS))]
            assert answers == expected, f"engine {engine} after loading {folder.name}"
        seen += expected
    return seen


def stored_dtype(checkpoint: Path) -> torch.dtype:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert len(dtypes) == 1, dtypes
    return dtypes.pop()


def run_family(family, config, tmp_path, few_rows_tofu, kept_ranks, auto_class, *dtype: str):
    """finetune -> unlearn -> evaluate in one session (`dtype`: a model.dtype override), then, for a float32
    run, greedy parity on the run's engines of the unlearned checkpoint and of the base loaded into them
    (the trainer's save holds the tied head of a tied model, so vLLM builds the head of engines started
    on it untied; `pmc make-tiny`'s base, saved by transformers, does not hold it). The unlearned model
    (float32) and what each unlearning engine reported."""
    base = make_tiny_family(family, tmp_path / "base")
    finetuned, run_dir = tmp_path / "finetuned", tmp_path / "run"
    unlearn = unlearn_config(config, finetuned, run_dir, few_rows_tofu, *dtype)
    float32 = unlearn.model.dtype == "float32"
    checkpoint = run_dir / "checkpoint-final"
    with open_session(unlearn, kept_ranks=kept_ranks) as session:
        timed("finetune", run_finetune, finetune_config(config, base, finetuned, few_rows_tofu, *dtype), session)
        # trained with gradient checkpointing (llama), saved for generation: the KV cache stays on
        assert json.loads((finetuned / "config.json").read_text())["use_cache"] is True
        timed("unlearn", run_unlearning, unlearn, session)
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [line["epoch"] for line in lines] == [1, 2]
        engines = json.loads((run_dir / "roles.json").read_text())["rollout_engines"]
        evaluation = timed("evaluate", run_evaluation, evaluate_config(run_dir, tmp_path / "eval", tmp_path), session)
        if float32:
            answers = timed("parity", greedy_parity, session, unlearn, config, auto_class, [checkpoint, base])
            print(f"greedy answers (engines = HF): {answers}")
            # not a degenerate model (e.g. one token repeated): parity over varied tokens
            assert len({token for answer in answers for token in answer}) > MAX_TOKENS
    assert len(engines) == 2 and {e["dtype"] for e in engines} == {unlearn.model.dtype}  # 2 engines, the run's dtype
    results = json.loads((evaluation.output_dir / "eval.json").read_text())
    assert results["forget"] is not None and results["sampling_attack"]["k"] == 2
    assert stored_dtype(checkpoint) == getattr(torch, unlearn.model.dtype)  # the run's dtype, kept
    return auto_class.from_pretrained(checkpoint, dtype=torch.float32), engines


def float32_pushes(config: str, base: Path, checkpoint: Path, data: Path, tmp_path: Path, ray_instance,
                   kept_ranks, auto_class, pushes: int = 2) -> list[list[tuple[int, ...]]]:
    """The unlearning path in float32: the shipped config's 2 ranks (its grad_accum, gradient checkpointing,
    prompt format) and 2 engines started on `base`, `checkpoint` loaded into the running engines as
    evaluation loads a run's checkpoint; then `pushes` times a PMC-shaped step (the engines' own greedy
    forget answers + retain rows, lambda-weighted) and a push. After the load and after every push, each
    engine's greedy answers equal HF `generate` on the weights consolidated from the shards. The answers."""
    from pmc_pipeline.data.prompts import PromptFormatter
    from pmc_pipeline.models.source import load_tokenizer
    from pmc_pipeline.recipes.roles import trainer_job

    from hf_reference import hf_greedy

    # lr 5e-5 instead of the config's 1e-5: one step must move a tiny model's greedy answers
    cfg = unlearn_config(config, checkpoint, tmp_path / "float32-run", data, "model.dtype=float32",
                         "trainer.learning_rate=5e-5")
    formatter = PromptFormatter(load_tokenizer(str(checkpoint)), cfg.model.prompt_format, cfg.model.system_prompt,
                                cfg.model.chat_date)
    rows = {split: [json.loads(line) for line in (data / f"{split}.json").read_text().splitlines()]
            for split in ("forget10", "retain90")}
    forget_prompts = [formatter.prompt_ids(r["question"]) for r in rows["forget10"]]
    prompts = forget_prompts + [formatter.prompt_ids(r["question"]) for r in rows["retain90"]]
    retain = [formatter.example(r["question"], r["answer"], "retain", cfg.trainer.max_length) for r in rows["retain90"]]
    tokenizer = formatter.tokenizer
    session, trainer, seen = open_session(cfg, kept_ranks=kept_ranks), None, []
    try:
        rollout = session.rollout(str(base), cfg.rollout, "float32", 0)
        rollout.load_checkpoint(str(checkpoint))
        per_rank = 2 * cfg.trainer.batch_size  # as run_unlearning: a winner and a retain row per slot
        trainer = session.trainer(cfg.trainer, trainer_job(cfg, str(checkpoint), per_rank, None))
        session.connect_weight_push(trainer, rollout, cfg.rollout)
        weights = checkpoint
        for push in range(pushes + 1):
            expected = hf_greedy(auto_class.from_pretrained(weights, dtype=torch.float32).eval(), prompts, MAX_TOKENS)
            for engine, actor in enumerate(rollout.actors):
                answers = [tuple(c.token_ids) for c in ray_instance.get(actor.greedy.remote(prompts, MAX_TOKENS))]
                assert answers == expected, f"engine {engine} after {'the checkpoint load' if push == 0 else f'push {push}'}"
            seen.append(expected)
            if push == pushes:
                break
            own = [tokenizer.decode(a, skip_special_tokens=True) for a in expected[:len(forget_prompts)]]
            forget = [formatter.example(r["question"], answer or "I do not know.", "forget", cfg.trainer.max_length)
                      for r, answer in zip(rows["forget10"], own)]
            batch = forget + retain  # one global micro-batch per grad_accum step: one optimizer step
            trainer.train_batches([batch] * cfg.trainer.grad_accum, {"forget": 1.0, "retain": cfg.pmc.lambda_retain})
            assert trainer.push_weights()["bytes"] > 0
            weights = tmp_path / f"float32-push-{push + 1}"
            trainer.save_pretrained(str(weights))
    finally:
        if trainer is not None:
            trainer.shutdown()
        session.close()
    return seen


def test_llama_3_2_finetune_unlearn_evaluate(tmp_path, few_rows_tofu, kept_ranks):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model, engines = run_family("llama-3.2", "llama-3.2-3b", tmp_path, few_rows_tofu, kept_ranks,
                                AutoModelForCausalLM, FLOAT32)
    assert {(e["model_impl"], e["model_class"]) for e in engines} == {("auto", "LlamaForCausalLM")}  # vLLM's own
    assert type(model) is LlamaForCausalLM and model.config.tie_word_embeddings


def test_phi_1_5_finetune_unlearn_evaluate(tmp_path, few_rows_tofu, kept_ranks):
    from transformers import AutoModelForCausalLM, PhiForCausalLM

    model, _ = run_family("phi-1.5", "phi-1.5", tmp_path, few_rows_tofu, kept_ranks, AutoModelForCausalLM, FLOAT32)
    assert type(model) is PhiForCausalLM


def test_gemma_3_finetune_unlearn_evaluate_on_vllms_transformers_backend(tmp_path, few_rows_tofu, ray_instance,
                                                                       kept_ranks):
    """vLLM's own Gemma-3 module cannot load on this CPU install (it imports transformers'
    Gemma3ImageProcessor, which needs torchvision, and only CUDA builds of torchvision exist for this
    torch: docs/platform.md), so `rollout.model_impl: auto` runs vLLM's Transformers backend (text only:
    `language_model_only`): the family runs like the others (every push into both engines, evaluation
    loading the checkpoint into them). bf16 has no greedy parity on vLLM-CPU, so parity is shown on the
    same path in float32: 2 engines started on the base (transformers' own layout) load the unlearned
    checkpoint, which the trainer saved in the hub's layout (language_model.model.*,
    vision_tower.vision_model.*), then two trained pushes; after each, both engines answer as HF does.
    The vision tower stays as loaded; `model_impl: vllm` is refused in one line before any run dir."""
    from transformers import AutoModelForImageTextToText, Gemma3ForConditionalGeneration

    model, engines = run_family("gemma-3", "gemma-3-12b", tmp_path, few_rows_tofu, kept_ranks,
                                AutoModelForImageTextToText)
    assert type(model) is Gemma3ForConditionalGeneration
    assert {(e["model_impl"], e["model_class"], e["language_model_only"]) for e in engines} == {
        ("transformers", "TransformersMultiModalForCausalLM", True)}
    answers = float32_pushes("gemma-3-12b", tmp_path / "base", tmp_path / "run" / "checkpoint-final", few_rows_tofu,
                             tmp_path, ray_instance, kept_ranks, AutoModelForImageTextToText)
    print(f"greedy answers after the load and each push (engines = HF): {answers}")
    assert answers[0] != answers[1] != answers[2]  # each push carried a change the answers show
    for stage in answers:  # varied tokens, not one token repeated: parity of a model still talking
        assert len({token for answer in stage for token in answer}) > MAX_TOKENS
    base, finetuned = tmp_path / "base", tmp_path / "finetuned"
    original = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    # compared as loaded: the trainer's save writes the vision tower as vision_tower.vision_model.*
    # (the hub's layout), transformers' own save of the base as vision_tower.*; both load the same model
    # the config trains and saves in bfloat16 and the tiny base is float32: "unchanged" is the base's
    # weights in the saved dtype (a bf16 base, as google/gemma-3-12b-it is, would compare as it is)
    saved = stored_dtype(finetuned)
    assert saved == torch.bfloat16
    for checkpoint in (finetuned, tmp_path / "run" / "checkpoint-final"):
        trained = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
        for part in ("vision_tower", "multi_modal_projector"):
            before, after = getattr(original.model, part).state_dict(), getattr(trained.model, part).state_dict()
            assert before.keys() == after.keys() and len(before) > 0
            assert all(torch.equal(before[k].to(saved).float(), after[k]) for k in before), (checkpoint, part)
        lm_before, lm_after = original.model.language_model.state_dict(), trained.model.language_model.state_dict()
        assert any(not torch.equal(lm_before[k].to(saved).float(), lm_after[k]) for k in lm_before)  # it trained
        assert (checkpoint / "processor_config.json").is_file()  # what vLLM's multimodal engine starts from
    run_dir = tmp_path / "refused"
    with pytest.raises(PMCError) as refused:
        check_unlearn(unlearn_config("gemma-3-12b", finetuned, run_dir, few_rows_tofu, "rollout.model_impl=vllm"))
    assert str(refused.value) == (
        f"model.path {finetuned}: vLLM 0.32.0 cannot load its own Gemma3ForConditionalGeneration module in this "
        f"install (No module named 'torchvision'); rollout.model_impl=auto or transformers runs it through "
        f"vLLM's Transformers backend")
    assert not run_dir.exists()
