"""Prompt formatting shared by rollout and training, so both see exactly the same tokens.

Instruct models: the tokenizer's chat template (system prompt + user question; the answer is the
assistant turn, end-of-turn token included). Base models: plain tags, pmc's
"Question: {q}\nAnswer:" followed by " {a}" and EOS, or (`model.plain_prompt: reference`) the PMC
reference code's "Question: {q}\n" followed by "Answer: {a}" and EOS, whose generations lose a
leading "Answer:" when decoded (as the reference strips it).

Every render passes `date_string` (`model.chat_date`): Llama-3.x templates otherwise write today's
date into the system header, so a run's prompts, training and scores would change with the calendar.
"""

from __future__ import annotations

from typing import Any

from trainer.records import TrainExample

# model.plain_prompt -> (prompt, what every answer starts with)
PLAIN_PROMPTS = {"pmc": ("Question: {question}\nAnswer:", " "), "reference": ("Question: {question}\n", "Answer: ")}


DEFAULT_CHAT_DATE = "10 Apr 2025"  # the PMC reference code's pinned date_string


class PromptFormatter:
    def __init__(self, tokenizer: Any, prompt_format: str = "auto", system_prompt: str | None = None,
                 chat_date: str = DEFAULT_CHAT_DATE, plain_prompt: str = "pmc"):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if prompt_format == "chat" and not has_template:
            raise ValueError("model.prompt_format=chat, but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.style = "chat" if prompt_format == "chat" or (prompt_format == "auto" and has_template) else "plain"
        self.system_prompt = system_prompt or None
        self.chat_date = chat_date
        self.plain_prompt = plain_prompt
        self.plain_template, plain_lead = PLAIN_PROMPTS[plain_prompt]
        # what an answer's text starts with after the prompt (a forced prefix goes after it)
        self.answer_lead = "" if self.style == "chat" else plain_lead

    @classmethod
    def for_model(cls, tokenizer: Any, model: Any) -> "PromptFormatter":
        """The formatter a config's `model:` section (prompt_format, system_prompt, chat_date, plain_prompt) asks for."""
        return cls(tokenizer, model.prompt_format, model.system_prompt, model.chat_date, model.plain_prompt)

    # -- text -----------------------------------------------------------------------------------
    def _messages(self, question: str) -> list[dict[str, str]]:
        messages = [{"role": "user", "content": question}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, date_string=self.chat_date
            )
        except Exception:
            # Some templates (Gemma) reject a system turn: fold it into the user turn instead.
            if messages and messages[0]["role"] == "system":
                system, rest = messages[0]["content"], messages[1:]
                rest = [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}] + rest[1:]
                return self.tokenizer.apply_chat_template(
                    rest, tokenize=False, add_generation_prompt=add_generation_prompt, date_string=self.chat_date
                )
            raise

    def prompt_text(self, question: str) -> str:
        if self.style == "chat":
            return self._chat(self._messages(question), add_generation_prompt=True)
        return self.plain_template.format(question=question)

    def answer_text(self, question: str, answer: str) -> str:
        """The text the model must produce after the prompt, end-of-answer marker included."""
        answer = answer.strip()
        if self.style == "chat":
            prompt = self.prompt_text(question)
            full = self._chat(self._messages(question) + [{"role": "assistant", "content": answer}], False)
            if full.startswith(prompt):
                return full[len(prompt):]
            return answer + (self.tokenizer.eos_token or "")
        return self.answer_lead + answer + (self.tokenizer.eos_token or "")

    # -- tokens ---------------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> list[int]:
        add_special = self.style == "plain"  # chat templates write their own BOS text
        return list(self.tokenizer(self.prompt_text(question), add_special_tokens=add_special)["input_ids"])

    def example(self, question: str, answer: str, role: str, max_length: int | None = None) -> TrainExample:
        prompt = self.prompt_ids(question)
        answer_ids = list(self.tokenizer(self.answer_text(question, answer), add_special_tokens=False)["input_ids"])
        if not answer_ids:
            answer_ids = [self.tokenizer.eos_token_id]
        ids = prompt + answer_ids
        if max_length is not None and len(ids) > max_length:
            # keep the whole prompt where possible; answers are truncated from the end
            ids = ids[:max(max_length, len(prompt) + 1)]
        return TrainExample(input_ids=tuple(ids), answer_start=len(prompt), role=role)

    def decode(self, token_ids) -> str:
        """Generated answer tokens -> the answer text as scored, stored and trained on.

        Decoding here (not in the engine) keeps one tokenizer for rollout and training."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
        lead = self.answer_lead.strip()
        if lead and text.startswith(lead):
            text = text[len(lead):].strip()
        return text
