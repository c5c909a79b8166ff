"""How a prompt becomes the text and token ids a policy sees, the same for SFT, RL and evaluation.

A prompt is a string or a chat ``messages`` list (``[{"role": ..., "content": ...}, ...]``).
With a chat template (``model.chat_template``, else the tokenizer's own) both go through it
with the generation prompt: a string becomes one user message, and ``data.system_prompt``
comes first as a system message. Without a template a string is used as it is (the toy
world's tokenizer has none) and a messages list is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


def messages_problem(value: Any) -> str | None:
    """What is wrong with a chat ``messages`` list, or None."""
    if not isinstance(value, list):
        return f"must be a string or a list of messages, got {type(value).__name__}"
    if not value:
        return "is an empty messages list"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i} must be an object with role and content, got {type(message).__name__}"
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}; roles are {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            got = "null" if message.get("content") is None else type(message.get("content")).__name__
            return f"message {i} ({message['role']}) content must be a string, got {got}"
    return None


def resolve_chat_template(tokenizer, override: str | None) -> str | None:
    """``model.chat_template`` (a Jinja string, or a file holding one) or the tokenizer's own."""
    if override:
        path = Path(override).expanduser()
        if "{" not in override and path.is_file():
            return path.read_text(encoding="utf-8")
        return override
    return getattr(tokenizer, "chat_template", None) or None


def as_messages(value: str | list, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else [dict(m) for m in value]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_text(value: str | list) -> str:
    """The prompt as reward functions see it: the string, or the last user message's content."""
    if isinstance(value, str):
        return value
    users = [m["content"] for m in value if m["role"] == "user"]
    return users[-1] if users else value[-1]["content"]


def render_prompt(tokenizer, value: str | list, template: str | None, system_prompt: str | None = None
                  ) -> tuple[str, list[int]]:
    """The text and token ids the policy is prompted with. ``template``: from
    ``resolve_chat_template``. Raises ValueError for a messages list without a template."""
    if template is None:
        if not isinstance(value, str):
            raise ValueError("is a messages list, but the tokenizer has no chat template (set model.chat_template)")
        return value, list(tokenizer(value).input_ids)  # special tokens added, as vLLM adds them to a text prompt
    text = tokenizer.apply_chat_template(
        as_messages(value, system_prompt), chat_template=template, tokenize=False, add_generation_prompt=True
    )
    return text, list(tokenizer(text, add_special_tokens=False).input_ids)  # the template writes its own


def render_exchange(tokenizer, value: str | list, response: str, template: str | None,
                    system_prompt: str | None = None) -> tuple[list[int], list[int]] | None:
    """Prompt ids and response ids (ending with the template's end-of-turn) of one SFT example,
    or None where the template's rendering of the exchange does not start with the prompt's."""
    prompt, prompt_ids = render_prompt(tokenizer, value, template, system_prompt)
    messages = as_messages(value, system_prompt) + [{"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    if not full.startswith(prompt):
        return None
    return prompt_ids, list(tokenizer(full[len(prompt):], add_special_tokens=False).input_ids)
