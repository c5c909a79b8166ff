"""SFT data: the prompt/response rows of ``data.source`` (or the toy world's), encoded as token
ids with labels on the response only, and padded into batches. Used by the SFT stage
(services/learner/sft.py) and by the PPO-ptx batches of RL (services/driver/ptx_data.py)."""

from __future__ import annotations

import sys

from services.core import toy_world
from services.core.config import FlywheelConfig
from services.core.data import load_rows
from services.core.errors import UserError
from services.core.prompts import render_exchange, render_prompt, resolve_chat_template

IGNORE = -100


def encode_example(tokenizer, prompt: str | list, response: str, max_prompt: int, max_response: int,
                   truncated: dict[str, int] | None = None, chat_template: str | None = None,
                   system_prompt: str | None = None):
    """Token ids and labels (IGNORE on the prompt) for one prompt/response pair, rendered as
    RL prompts are (``services.core.prompts``: through ``chat_template``, i.e. model.chat_template,
    else the tokenizer's own template, if any). A prompt over ``max_prompt`` tokens keeps its
    last ones, a response over ``max_response`` its first ones; ``truncated``
    (``{"prompt": 0, "response": 0}``) counts them."""
    template = resolve_chat_template(tokenizer, chat_template)
    if template is not None:
        exchange = render_exchange(tokenizer, prompt, response, template, system_prompt)
        if exchange is not None:
            return _truncate(*exchange, max_prompt, max_response, truncated)
        if not isinstance(prompt, str):
            raise ValueError("the chat template's rendering of prompt + response does not start with the prompt's")
        prompt_ids = tokenizer(prompt).input_ids
    else:
        _, prompt_ids = render_prompt(tokenizer, prompt, None)
    check_response_end(tokenizer, template)
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return _truncate(prompt_ids, response_ids, max_prompt, max_response, truncated)


def check_response_end(tokenizer, template: str | None) -> None:
    """Without a chat template (``template``: the resolved one, or None), each SFT response
    ends with the eos token, so that the model learns to stop: a tokenizer with none is refused
    (its None id failed deep in the collation)."""
    if tokenizer.eos_token_id is None and template is None:
        raise UserError(
            f"model.path: the tokenizer in {tokenizer.name_or_path} has no eos token, which ends each SFT response "
            "(without a chat template) so that the model learns to stop; set eos_token in its tokenizer_config.json"
        )


def _truncate(prompt_ids, response_ids, max_prompt, max_response, truncated=None):
    if truncated is not None:
        truncated["prompt"] += len(prompt_ids) > max_prompt
        truncated["response"] += len(response_ids) > max_response
    prompt_ids, response_ids = prompt_ids[-max_prompt:], response_ids[:max_response]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def truncation_warning(truncated: dict[str, int], rows: int, max_prompt: int, max_response: int) -> str | None:
    """One line saying how many training rows were cut to data.max_prompt_tokens /
    data.max_response_tokens (None when none were). SFT truncates, as is usual: the prompt
    keeps its end (next to the response), the response its start (it loses its EOS)."""
    parts = []
    if truncated["prompt"]:
        parts.append(
            f"{truncated['prompt']} of {rows} prompts are longer than data.max_prompt_tokens={max_prompt} "
            f"(kept their last {max_prompt} tokens)"
        )
    if truncated["response"]:
        parts.append(
            f"{truncated['response']} of {rows} responses are longer than data.max_response_tokens={max_response} "
            f"(kept their first {max_response} tokens, without the end-of-sequence token)"
        )
    return f"warning: {'; '.join(parts)}" if parts else None


def collate(examples, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention[i, : len(ids)] = 1
    return input_ids, attention, labels


def sft_rows(cfg: FlywheelConfig) -> list[dict]:
    """``prompt`` (a string or a chat messages list) and ``response`` of every SFT row."""
    if cfg.data.source == "toy":
        return toy_world.sft_corpus(cfg.data.toy_tasks, cfg.data.toy_size, cfg.seed)
    keys = [cfg.data.prompt_key, cfg.data.response_key]
    rows = load_rows(
        cfg.data.source,
        keys,
        split=cfg.data.split,
        key_fields={cfg.data.prompt_key: "data.prompt_key", cfg.data.response_key: "data.response_key"},
        chat_keys=(cfg.data.prompt_key,),
    )
    out = [{"prompt": r[keys[0]], "response": r[keys[1]]} for r in rows]
    blank = [i for i, r in enumerate(out) if isinstance(r["response"], str) and not r["response"].strip()]
    if blank:  # trained on as they are (an empty answer is a choice), but rarely meant
        print(f"warning: {len(blank)} of {len(out)} rows of {cfg.data.source} have a {cfg.data.response_key!r} that "
              f"is empty or only whitespace (the first: row {blank[0] + 1}); they are trained on as they are",
              file=sys.stderr)
    return out
