"""Random-init, CPU-sized checkpoints of the shipped model families: `pmc make-tiny <family> <dir>`.

Each keeps its family's architecture class and the config features the real checkpoints have, shrunk
to 2 layers and a small hidden size (head_dim 32: vLLM-CPU's attention supports 32, 64, 80, ...):

- `llama-3.2`: LlamaForCausalLM, tied embeddings, grouped-query attention (2 query heads, 1 KV head),
  llama3 rope scaling, the real Llama-3 tokenizer and Llama-3.2-Instruct chat template
  (../shared/tokenizers/llama3; 128,256 x 64 tied embedding = 33 MB in float32: the vocabulary is
  the real one, so the hidden size is kept at 64).
- `phi-1.5`: PhiForCausalLM, partial rotary embeddings (factor 0.5), untied lm_head with bias, the
  GPT-2 BPE (../shared/tokenizers/gpt2; Phi-1.5's CodeGen tokenizer is GPT-2's plus whitespace
  tokens) and vocab_size 51,200 as Phi-1.5 pads it; a base model: no chat template.
- `gemma-3`: the multimodal Gemma3ForConditionalGeneration (the class google/gemma-3-12b-it is):
  a 1-layer SigLIP vision tower, the multimodal projector, a Gemma3 text model with one sliding-window
  and one global layer, tied embeddings; transformers 5 names the modules `model.language_model.*`,
  `model.vision_tower.*` and its save_pretrained writes them in the hub's layout
  (`language_model.model.*`, `vision_tower.*`, as google/gemma-3-12b-it has them). Tokenizer: a byte-level BPE trained here on the
  given texts with Gemma's special tokens (<pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>
  <start_of_image> <end_of_image> <image_soft_token>) and Gemma-3-it's chat template (reproduced from
  google/gemma-3-*-it's tokenizer_config as far as known here): no system role; a system message is
  folded into the first user turn followed by a blank line, as Gemma-3's own template does. As in
  the real checkpoint the tokenizer's eos is <eos> and generation_config stops on <eos> and
  <end_of_turn>. Processor files (processor_config.json, preprocessor_config.json with a
  Gemma3 image processor) let vLLM start its multimodal engine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from pmc_pipeline.errors import PMCError
from pmc_pipeline.runtime.atomic import atomic_dir, require_new_dir

SHARED_TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"
FAMILIES = ("llama-3.2", "phi-1.5", "gemma-3")

GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>", "<image_soft_token>"]

# google/gemma-3-*-it's chat template (system turn folded into the first user turn, roles must
# alternate, the assistant is called "model"), image items written as <start_of_image>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# small so that a CPU runs it, head_dim 32 for vLLM-CPU's attention kernels
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 2, 1, 32


def _tokenizer_dir(name: str) -> Path:
    folder = Path(os.environ.get("PMC_SHARED_TOKENIZERS", SHARED_TOKENIZERS)) / name
    if not folder.is_dir():
        raise PMCError(f"tokenizer folder not found: {folder} (set PMC_SHARED_TOKENIZERS to the folder "
                       "holding gpt2/ and llama3/)")
    return folder


def _default_texts() -> list[str]:
    """TOFU question/answer text when ../shared/data/tofu is there, else a little built-in text."""
    tofu = SHARED_TOKENIZERS.parent / "data" / "tofu" / "full.json"
    if tofu.is_file():
        rows = [json.loads(line) for line in tofu.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [f"{r['question']} {r['answer']}" for r in rows]
    return ["The quick brown fox jumps over the lazy dog. Who wrote the book? The author was born in 1950."] * 50


def _llama(tmp: Path, seed: int, texts: Iterable[str] | None) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir("llama3"))
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    eos_ids = [tokenizer.convert_tokens_to_ids("<|end_of_text|>"), eot]
    config = LlamaConfig(
        vocab_size=128256, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=None,
        # With tied embeddings and the default 0.02 init, 2 tiny layers barely move the residual
        # stream: every prompt's greedy answer is its last token repeated, which tests nothing.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def _phi(tmp: Path, seed: int, texts: Iterable[str] | None) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, PhiConfig, PhiForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir("gpt2"))
    config = PhiConfig(
        vocab_size=51200, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, partial_rotary_factor=0.5,
        max_position_embeddings=2048, hidden_act="gelu_new", tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = PhiForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def _gemma_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    # Gemma's tokenizer prepends <bos> to plain text (add_special_tokens=True)
    bpe.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        chat_template=GEMMA3_CHAT_TEMPLATE, model_max_length=131072, padding_side="left",
    )


def _gemma(tmp: Path, seed: int, texts: Iterable[str] | None) -> None:
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, GenerationConfig,
                              SiglipVisionConfig)
    from transformers.models.gemma3 import Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = _gemma_tokenizer(texts if texts is not None else _default_texts())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA_SPECIAL}
    image_size, patch_size, mm_tokens = 64, 16, 4  # 4x4 patches pooled to 2x2 = 4 soft tokens per image
    vision = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
                                num_attention_heads=HEADS, image_size=image_size, patch_size=patch_size,
                                vision_use_head=False, layer_norm_eps=1e-6)
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=131072,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        tie_word_embeddings=True, bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        pad_token_id=ids["<pad>"],
    )
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True,
        bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], pad_token_id=ids["<pad>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                               eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    model.save_pretrained(tmp)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                              do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=mm_tokens)
    processor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


MAKERS: dict[str, Callable[[Path, int, Any], None]] = {"llama-3.2": _llama, "phi-1.5": _phi, "gemma-3": _gemma}


def make_tiny_family(family: str, out_dir: str | os.PathLike, seed: int = 0,
                     texts: Iterable[str] | None = None) -> Path:
    """Write a random-init, 2-layer checkpoint of `family` (one of FAMILIES) to `out_dir` (new or empty).

    float32 weights, HF format, tokenizer (and for gemma-3 the processor files) included. `texts`
    train gemma-3's small tokenizer (default: TOFU text from ../shared, else a built-in sentence);
    the other families use the real tokenizers and ignore them."""
    if family not in MAKERS:
        raise PMCError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    out = require_new_dir(out_dir, "dir")
    if out.is_dir():  # empty: atomic_dir renames a finished temp folder into place
        out.rmdir()
    with atomic_dir(out) as tmp:
        MAKERS[family](tmp, seed, texts)
        (tmp / "pmc_tiny_family.json").write_text(json.dumps({"family": family, "seed": seed}, indent=2))
    return out
