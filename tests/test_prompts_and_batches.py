"""Prompt formatting (chat template and plain tags) and forget/retain batch composition."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from pmc_pipeline.data.prompts import PromptFormatter
from pmc_pipeline.method.chunks import RetainStream, pair_with_retain
from trainer.records import TrainExample


@pytest.fixture(scope="module")
def llama3_tokenizer(tofu_dir):
    return AutoTokenizer.from_pretrained(str(tofu_dir.parent.parent / "tokenizers" / "llama3"))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_plain_format_uses_question_answer_tags_and_ends_with_eos(tiny_tokenizer):
    fmt = PromptFormatter(tiny_tokenizer, "auto")
    assert fmt.style == "plain"
    example = fmt.example("Who is Ada?", "A poet.", "retain")
    prompt = tiny_tokenizer.decode(example.input_ids[:example.answer_start])
    answer = tiny_tokenizer.decode(example.input_ids[example.answer_start:])
    assert prompt == "Question: Who is Ada?\nAnswer:"
    assert answer == " A poet." + tiny_tokenizer.eos_token
    assert list(example.input_ids[:example.answer_start]) == fmt.prompt_ids("Who is Ada?")


def test_chat_format_uses_the_template_and_trains_on_the_assistant_turn(llama3_tokenizer):
    fmt = PromptFormatter(llama3_tokenizer, "auto", "You are a helpful assistant.")
    assert fmt.style == "chat"
    example = fmt.example("Who is Ada?", "A poet.", "forget")
    prompt = llama3_tokenizer.decode(example.input_ids[:example.answer_start])
    answer = llama3_tokenizer.decode(example.input_ids[example.answer_start:])
    assert prompt.startswith("<|begin_of_text|>") and "Who is Ada?" in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert answer == "A poet.<|eot_id|>"
    assert prompt.count("<|begin_of_text|>") == 1  # no second BOS added by the tokenizer


def test_decode_strips_special_tokens_and_whitespace(tiny_tokenizer):
    fmt = PromptFormatter(tiny_tokenizer, "plain")
    ids = tiny_tokenizer(" A poet.", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert fmt.decode(ids) == "A poet."


def test_chat_format_requires_a_template(tiny_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormatter(tiny_tokenizer, "chat")


def _examples(role, count):
    return [TrainExample(input_ids=(1, 2, 3 + i), answer_start=2, role=role) for i in range(count)]


def test_each_forget_winner_is_paired_with_a_retain_example():
    forget, retain = _examples("forget", 10), _examples("retain", 3)
    batches = pair_with_retain(forget, RetainStream(retain, np.random.default_rng(0)), batch_size=4)
    assert [len(b) for b in batches] == [8, 8, 4]
    flat = [e for b in batches for e in b]
    assert [e.role for e in flat] == ["forget", "retain"] * 10  # alternating: every rank stride gets both
    assert [e for e in flat if e.role == "forget"] == forget  # in the order given
    # retain examples are drawn without replacement until the pool is used up, then reshuffled
    drawn = [e.input_ids for e in flat if e.role == "retain"]
    assert all(len(set(drawn[i:i + 3])) == 3 for i in (0, 3, 6))


def test_no_winners_means_no_batches():
    assert pair_with_retain([], RetainStream(_examples("retain", 3), np.random.default_rng(0)), 4) == []


class _Clock:
    """A stand-in for the datetime class transformers' chat templates read `strftime_now` from."""

    day = None

    @classmethod
    def now(cls):
        return cls.day


def test_llama3_prompts_carry_the_configured_date_not_todays(llama3_tokenizer, monkeypatch):
    import datetime

    import transformers.utils.chat_template_utils as chat_templates

    monkeypatch.setattr(chat_templates, "datetime", _Clock)
    messages = [{"role": "user", "content": "Who is Ada?"}]
    rendered, ids, examples = [], [], []
    for day in (datetime.datetime(2026, 12, 1), datetime.datetime(2031, 7, 19)):
        _Clock.day = day
        # the template alone reads the (moved) clock: proof that the clock really moved
        rendered.append(llama3_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        fmt = PromptFormatter(llama3_tokenizer, "chat", "You are a helpful assistant.")
        ids.append(fmt.prompt_ids("Who is Ada?"))
        examples.append(fmt.example("Who is Ada?", "A poet.", "forget").input_ids)
    assert "Today Date: 01 Dec 2026" in rendered[0] and "Today Date: 19 Jul 2031" in rendered[1]
    assert ids[0] == ids[1] and examples[0] == examples[1]  # training and sampling alike
    assert "Today Date: 10 Apr 2025\n" in llama3_tokenizer.decode(ids[0])
    other = PromptFormatter(llama3_tokenizer, "chat", None, chat_date="02 Jan 2024").prompt_text("Who is Ada?")
    assert "Today Date: 02 Jan 2024\n" in other



@pytest.fixture(scope="module")
def gpt2_tokenizer(tofu_dir):
    """Phi-1.5's tokenizer family (GPT-2 BPE): the model the PMC reference's plain prompt is for."""
    return AutoTokenizer.from_pretrained(str(tofu_dir.parent.parent / "tokenizers" / "gpt2"))


def test_the_reference_plain_prompt_ends_at_the_newline_and_its_answers_lose_the_answer_tag(gpt2_tokenizer):
    """model.plain_prompt=reference: "Question: {q}\\n" (the PMC reference's, not pmc's "...\\nAnswer:"),
    trained as "Answer: {a}" + EOS; a generated leading "Answer:" is stripped, as the reference does."""
    fmt = PromptFormatter(gpt2_tokenizer, "plain", plain_prompt="reference")
    example = fmt.example("Who is Ada?", "A poet.", "retain")
    assert gpt2_tokenizer.decode(example.input_ids[:example.answer_start]) == "Question: Who is Ada?\n"
    assert gpt2_tokenizer.decode(example.input_ids[example.answer_start:]) == "Answer: A poet." + gpt2_tokenizer.eos_token
    generated = gpt2_tokenizer("Answer: A poet.", add_special_tokens=False)["input_ids"]
    assert fmt.decode(generated) == "A poet."
    assert fmt.decode(gpt2_tokenizer(" A poet.", add_special_tokens=False)["input_ids"]) == "A poet."
    # pmc's own plain prompt keeps "Answer:" in the prompt, and a prefilled answer starts after the tag's lead
    pmc = PromptFormatter(gpt2_tokenizer, "plain")
    assert gpt2_tokenizer.decode(pmc.prompt_ids("Who is Ada?")) == "Question: Who is Ada?\nAnswer:"
    from pmc_pipeline.eval.attacks import forced_prefix_ids

    assert gpt2_tokenizer.decode(forced_prefix_ids(fmt, "The answer is:")) == "Answer: The answer is:"
    assert gpt2_tokenizer.decode(forced_prefix_ids(pmc, "The answer is:")) == " The answer is:"
