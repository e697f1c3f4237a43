"""The tiny random-init checkpoints of the shipped families (`pmc make-tiny`): architecture class and
config features of the real ones, tokenizer and chat template, and pmc's own up-front model checks.
No engine starts here."""

from __future__ import annotations

import json

import pytest

from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.errors import ConfigError, PMCError
from pmc_pipeline.models.families import FAMILIES, make_tiny_family
from pmc_pipeline.models.source import validate_model_folder

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def tiny_families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-families")
    return {family: make_tiny_family(family, root / family) for family in FAMILIES}


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_llama_has_the_llama_3_2_features(tiny_families):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cfg = config_of(tiny_families["llama-3.2"])
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # grouped-query attention
    assert cfg["num_hidden_layers"] == 2 and cfg["head_dim"] == 32 and cfg["vocab_size"] == 128256
    # transformers 5 writes rope_scaling as rope_parameters
    rope = cfg["rope_parameters"]
    assert rope["rope_type"] == "llama3"
    assert {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} <= rope.keys()
    model = AutoModelForCausalLM.from_pretrained(tiny_families["llama-3.2"], dtype=torch.float32)
    assert type(model) is LlamaForCausalLM
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_llama_uses_the_real_llama_3_tokenizer_and_chat_template(tiny_families):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_families["llama-3.2"])
    assert len(tokenizer) == 128256 and tokenizer.eos_token == "<|eot_id|>"
    prompt = PromptFormatter(tokenizer, "chat", SYSTEM).prompt_text("Who?")
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert SYSTEM in prompt and prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_phi_has_partial_rotary_and_an_untied_head(tiny_families):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PhiForCausalLM

    cfg = config_of(tiny_families["phi-1.5"])
    assert cfg["architectures"] == ["PhiForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert cfg["partial_rotary_factor"] == 0.5 and cfg["num_hidden_layers"] == 2
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 32
    model = AutoModelForCausalLM.from_pretrained(tiny_families["phi-1.5"], dtype=torch.float32)
    assert type(model) is PhiForCausalLM
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(tiny_families["phi-1.5"])
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's ids
    formatter = PromptFormatter(tokenizer, "plain", SYSTEM)
    assert formatter.prompt_text("Who?") == "Question: Who?\nAnswer:"  # base model: no system prompt


def test_gemma_is_the_multimodal_class_with_a_vision_tower(tiny_families):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, Gemma3ForConditionalGeneration

    folder = tiny_families["gemma-3"]
    cfg = config_of(folder)
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"] and cfg["model_type"] == "gemma3"
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    text = cfg["text_config"]
    assert text["model_type"] == "gemma3_text" and text["num_hidden_layers"] == 2 and text["head_dim"] == 32
    assert "sliding_attention" in text["layer_types"] and "full_attention" in text["layer_types"]
    assert text["sliding_window"] > 0 and cfg["tie_word_embeddings"] is True
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    # transformers 5 names the modules model.language_model.* / model.vision_tower.* but save_pretrained
    # writes the hub's layout (language_model.model.*, vision_tower.*), as google/gemma-3-12b-it has it
    assert any(n.startswith("language_model.model.layers.") for n in names)
    assert any(n.startswith("vision_tower.") for n in names)
    assert any(n.startswith("multi_modal_projector.") for n in names)
    # what users load it with: the image-text class, and the causal-LM auto class pmc's trainer uses
    # (transformers maps model_type gemma3 to the same multimodal class)
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        model = auto.from_pretrained(folder, dtype=torch.float32)
        assert type(model) is Gemma3ForConditionalGeneration
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_gemma_tokenizer_processor_and_template_have_no_system_role(tiny_families):
    from transformers import AutoProcessor, AutoTokenizer

    folder = tiny_families["gemma-3"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for token in ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id, token
    user = [{"role": "user", "content": "Who?"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == \
        "<bos><start_of_turn>user\nWho?<end_of_turn>\n<start_of_turn>model\n"
    # no system role: Gemma-3's template folds the system message into the first user turn
    folded = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}] + user, tokenize=False,
                                           add_generation_prompt=True)
    assert folded == f"<bos><start_of_turn>user\n{SYSTEM}\n\nWho?<end_of_turn>\n<start_of_turn>model\n"
    assert "system" not in folded
    formatter = PromptFormatter(tokenizer, "chat", SYSTEM)
    assert formatter.prompt_text("Who?") == folded
    assert formatter.answer_text("Who?", "Me.") == "Me.<end_of_turn>\n"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Gemma3Processor" and processor.image_seq_length == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_pmc_up_front_checks_accept_every_family(tiny_families, family):
    validate_model_folder(str(tiny_families[family]), vllm=False, trainer=True)
    validate_model_folder(str(tiny_families[family]), vllm=True, trainer=True)  # Gemma-3: the Transformers backend
    if family == "gemma-3":  # vLLM's own module cannot load here (torchvision): asked for, it is refused
        with pytest.raises(ConfigError, match="cannot load its own Gemma3ForConditionalGeneration module"):
            validate_model_folder(str(tiny_families[family]), vllm=True, trainer=True, model_impl="vllm")


def test_make_tiny_cli_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(PMCError, match="already exists and is not empty"):
        make_tiny_family("phi-1.5", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(PMCError, match="unknown model family"):
        make_tiny_family("gpt-5", tmp_path / "new")


def test_make_tiny_command_writes_a_loadable_folder(tmp_path, capsys):
    from pmc_pipeline.cli import main  # what the `pmc` console script calls

    out = tmp_path / "phi"
    assert main(["make-tiny", "phi-1.5", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    validate_model_folder(str(out), vllm=False)
    assert main(["make-tiny", "phi-1.5", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_the_engine_stops_where_hf_generate_does(tiny_families):
    """Gemma-3-it ends answers with <end_of_turn>, not its tokenizer's <eos>: the rollout engine takes
    the checkpoint's generation_config eos ids as stop tokens (vLLM alone would stop on <eos> only)."""
    from transformers import AutoTokenizer

    from rollout.model_impl import model_stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_families["gemma-3"])
    stops = model_stop_token_ids(str(tiny_families["gemma-3"]))
    assert set(stops) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") != tokenizer.eos_token_id
    assert model_stop_token_ids(str(tiny_families["phi-1.5"])) == (50256,)
    assert model_stop_token_ids("microsoft/phi-1_5") == ()  # a hub id: vLLM's own eos handling


def test_every_command_renders_prompts_with_model_chat_date(tiny_families, tmp_path, tofu_dir):
    from pmc_pipeline.config import load_config
    from pmc_pipeline.recipes.evaluate import check_evaluate, load_evaluate_config
    from pmc_pipeline.recipes.finetune import check_finetune
    from pmc_pipeline.recipes.unlearn import check_unlearn

    model = tiny_families["llama-3.2"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Who is Ada?", "answer": "A poet."}) + "\n")
    model_keys = [f"model.path={model}", "model.chat_date=03 Mar 2023"]
    finetune = check_finetune(load_config("finetune", "finetune/llama-3.2-3b", [*model_keys, f"data.train={qa}"]))
    unlearn = check_unlearn(load_config("unlearn", "unlearn/llama-3.2-3b", [
        *model_keys, f"data.forget={qa}", f"data.retain={qa}", "rollout.max_model_len=512", f"run_dir={tmp_path}/run"]))
    evaluate = check_evaluate(load_evaluate_config(str(model), [
        "model.chat_date=03 Mar 2023", "rollout.max_model_len=512", f"data.tofu_dir={tofu_dir}",
        f"output_dir={tmp_path}/eval"]))
    for inputs in (finetune, unlearn, evaluate):
        assert "Today Date: 03 Mar 2023\n" in inputs.formatter.prompt_text("Who?")
