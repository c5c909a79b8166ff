"""RL prompts from the run's data: the toy world, or a user's jsonl / parquet / ``datasets``
rows (``data.source``), rendered for the policy and checked before any actor starts.

Each prompt becomes a ``PromptItem`` dict: a stable ``id`` (``data.id_key``, else the row
index plus a hash of the row), ``prompt`` (the text reward functions see: the string, or a
messages list's last user message), ``prompt_ids`` (what the engine is prompted with,
through the chat template when there is one, see ``services.core.prompts``) and ``columns``
(every other column of the row, so that a reference ``answer`` reaches the verifier).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from services.core.config import FlywheelConfig
from services.core.data import load_rows
from services.core.errors import UserError
from services.core.prompts import prompt_text, render_prompt, resolve_chat_template
from services.core.special_tokens import load_padding_tokenizer
from services.core.toy_world import TASKS
from services.reward.scorers import scorer_class, scorer_name
from services.rpc.struct_columns import check_json_value


def load_tokenizer(policy: str | Path, cfg: FlywheelConfig):
    """The policy's tokenizer; a UserError when it has neither a pad nor an eos token (the
    learner pads with one of them), before Ray starts."""
    return load_padding_tokenizer(policy, "model.path", cfg.model.trust_remote_code)


def toy_rows(cfg: FlywheelConfig) -> list[dict[str, Any]]:
    """The toy tasks' prompts: ``cfg.data.toy_size`` per task in ``data.toy_tasks``."""
    if not cfg.data.toy_tasks:
        raise UserError("data.toy_tasks: no toy task selected; name at least one of " + ", ".join(TASKS))
    return [
        {"id": row.id, "prompt": row.prompt, "columns": {"task": name}}
        for name in dict.fromkeys(cfg.data.toy_tasks)  # a task listed twice would repeat its ids
        for row in TASKS[name].prompts(cfg.data.toy_size, seed=cfg.seed)
    ]


def reward_columns(cfg: FlywheelConfig) -> list[tuple[str, str]]:
    """(scorer field and name, column) for every prompt column a reward scorer reads."""
    return [
        (f"reward scorer '{scorer_name(s, i)}' (reward.scorers.{i})", column)
        for i, s in enumerate(cfg.reward.scorers) for column in scorer_class(s, i).columns_needed(s)
    ]


def row_id(row: dict[str, Any], index: int) -> str:
    digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    return f"{index}-{digest[:10]}"


def file_rows(cfg: FlywheelConfig, tokenizer, source: str, field: str = "data.source") -> list[dict[str, Any]]:
    """PromptItem dicts (``prompt_ids`` not yet set) from a user's dataset; UserError naming
    the file and line (or row) and the key for every problem listed in the module doc."""
    data = cfg.data
    key = data.prompt_key
    template = resolve_chat_template(tokenizer, cfg.model.chat_template)
    needed = reward_columns(cfg)

    def check(row: dict[str, Any]) -> str | None:
        if isinstance(row[key], list) and template is None:
            return (f"key '{key}' is a chat messages list, but the tokenizer has no chat template; "
                    "set model.chat_template or give string prompts")
        if data.id_key is not None:
            if data.id_key not in row or row[data.id_key] is None:
                return f"missing key '{data.id_key}' (set by data.id_key)"
            if not isinstance(row[data.id_key], (str, int)) or isinstance(row[data.id_key], bool):
                return f"key '{data.id_key}' (data.id_key) must be a string or an integer"
        for who, column in needed:
            if row.get(column) is None:
                return f"no value for column '{column}', which {who} reads (answer_key)"
        for column, value in row.items():
            try:
                check_json_value(value, f"column '{column}'")
            except ValueError as exc:
                return str(exc)
        return None

    places: list[str] = []
    rows = load_rows(source, [key], split=data.split, key_fields={key: "data.prompt_key"}, check=check,
                     chat_keys=(key,), locations=places, field=field)
    seen: dict[str, str] = {}
    items = []
    for index, (row, place) in enumerate(zip(rows, places)):
        item_id = str(row[data.id_key]) if data.id_key is not None else row_id(row, index)
        if item_id in seen:
            raise UserError(f"{place}: data.id_key '{data.id_key}' value {item_id!r} repeats {seen[item_id]}; "
                            "prompt ids must be unique")
        seen[item_id] = place
        columns = {k: v for k, v in row.items() if k != key}
        items.append({"id": item_id, "prompt": row[key], "columns": columns, "place": place})
    return items


def render_items(cfg: FlywheelConfig, tokenizer, items: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(kept, overlong): each item with ``prompt`` as reward functions see it and
    ``prompt_ids`` as the engine is prompted; prompts over data.max_prompt_tokens raise a
    UserError (``data.overlong_prompts: error``) or are left out (``skip``)."""
    data = cfg.data
    template = resolve_chat_template(tokenizer, cfg.model.chat_template)
    if template is None and data.system_prompt:
        raise UserError("data.system_prompt: the tokenizer has no chat template to put it in; "
                        "set model.chat_template or remove data.system_prompt")
    kept, overlong = [], []
    for item in items:
        _, ids = render_prompt(tokenizer, item["prompt"], template, data.system_prompt)
        rendered = {"id": item["id"], "prompt": prompt_text(item["prompt"]), "columns": item["columns"],
                    "prompt_ids": ids}
        (overlong if len(ids) > data.max_prompt_tokens else kept).append({**rendered, "place": item.get("place")})
    if overlong and data.overlong_prompts == "error":
        longest = max(overlong, key=lambda it: len(it["prompt_ids"]))
        where = f" at {longest['place']}" if longest.get("place") else ""
        raise UserError(
            f"data.max_prompt_tokens: {len(overlong)} of {len(items)} prompts are longer than {data.max_prompt_tokens} "
            f"tokens (the longest, '{longest['id']}'{where}, has {len(longest['prompt_ids'])}); RL does not truncate "
            "prompts: raise data.max_prompt_tokens, shorten them, or set data.overlong_prompts: skip"
        )
    if not kept:
        raise UserError(f"data.max_prompt_tokens: all {len(items)} prompts are longer than {data.max_prompt_tokens} "
                        "tokens; none is left to train on")
    for item in kept:
        item.pop("place")
    return kept, overlong


EVAL_SEED_OFFSET = 1_000_003  # the toy world's held-out prompts: its generator under another seed


def toy_eval_rows(cfg: FlywheelConfig) -> list[dict[str, Any]]:
    """``data.eval_prompts`` fresh toy prompts per task (another seed; ids that cannot clash)."""
    held_out = cfg.model_copy(update={
        "seed": cfg.seed + EVAL_SEED_OFFSET, "data": cfg.data.model_copy(update={"toy_size": cfg.data.eval_prompts})
    })
    return [{**row, "id": f"eval-{row['id']}"} for row in toy_rows(held_out)]


def split_held_out(items: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded ``fraction`` of the rows, at least one, at most all but one."""
    order = list(range(len(items)))
    random.Random(f"eval-split-{seed}").shuffle(order)
    n = min(max(1, round(fraction * len(items))), len(items) - 1) if fraction > 0 else 0
    held = set(order[:n])
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


def rl_prompts(cfg: FlywheelConfig, policy: str | Path) -> tuple[list[dict], list[dict]]:
    """(train, eval) prompts as PromptItem dicts, checked and rendered; the eval list is empty
    unless algorithm.eval_every is set. A skip of overlong prompts is said once."""
    tokenizer = load_tokenizer(policy, cfg)
    data, evaluating = cfg.data, cfg.algorithm.eval_every > 0
    raw = toy_rows(cfg) if data.source == "toy" else file_rows(cfg, tokenizer, data.source)
    held: list[dict] = []
    if evaluating:
        if data.eval_source is not None:
            eval_cfg = cfg.model_copy(update={"data": data.model_copy(update={"split": data.eval_split})})
            held = file_rows(eval_cfg, tokenizer, data.eval_source, field="data.eval_source")
        elif data.source == "toy":
            held = toy_eval_rows(cfg)
        else:
            if len(raw) < 2 or not data.eval_fraction:
                raise UserError("data.eval_fraction: algorithm.eval_every needs held-out prompts: set "
                                "data.eval_source, or a data.eval_fraction that leaves rows on both sides")
            raw, held = split_held_out(raw, data.eval_fraction, cfg.seed)
    kept, overlong = render_items(cfg, tokenizer, raw)
    if overlong:
        print(f"data.overlong_prompts: skip: left out {len(overlong)} of {len(raw)} prompts longer than "
              f"data.max_prompt_tokens={data.max_prompt_tokens} tokens")
    if not evaluating:
        return kept, []
    try:
        held_kept, held_over = render_items(cfg, tokenizer, held)
    except UserError as exc:
        raise UserError(f"{exc} (the held-out prompts)") from None
    if held_over:
        print(f"data.overlong_prompts: skip: left out {len(held_over)} of {len(held)} held-out prompts")
    return kept, held_kept
