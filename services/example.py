"""`flywheel example DIR`: everything the "Bring your own model and data" walkthrough needs,
made locally (no downloads): DIR/train.jsonl and DIR/test.jsonl (GSM8K-format word problems,
services/core/word_problems.py), DIR/train_tools.jsonl (the same problems as SFT traces that
call the calculator tool) and DIR/model, a randomly initialised Qwen2 chat model with a
byte-level BPE tokenizer trained on those problems and a ChatML chat template."""

from __future__ import annotations

import json
from pathlib import Path

from services.core.prompts import render_prompt
from services.core.tiny_model import build_chat_qwen2, train_chat_tokenizer
from services.core.word_problems import MAX_NUMBER, write_splits


def write_example(directory: str | Path, seed: int = 0, train: int = 4000, test: int = 200,
                  vocab_size: int = 512, max_number: int = MAX_NUMBER, **model_size) -> dict[str, str]:
    """``model_size``: build_chat_qwen2's size arguments (hidden_size, num_layers, ...), else its
    defaults (the walkthrough's 0.85 M-parameter model)."""
    directory = Path(directory)
    paths = write_splits(directory, train, test, seed, max_number)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    tokenizer = train_chat_tokenizer([r["question"] + "\n" + r["answer"] for r in rows] + ["system user assistant"],
                                     vocab_size)
    model = build_chat_qwen2(tokenizer, seed, **model_size)
    model.save_pretrained(directory / "model", safe_serialization=True)
    tokenizer.save_pretrained(directory / "model")
    longest = max(len(render_prompt(tokenizer, r["question"], tokenizer.chat_template)[1]) for r in rows)
    summary = {"train": str(paths["train"]), "test": str(paths["test"]), "train_tools": str(paths["train_tools"]),
               "model": str(directory / "model"),
               "parameters": sum(p.numel() for p in model.parameters()), "longest_prompt_tokens": longest}
    (directory / "example.json").write_text(json.dumps(summary, indent=2))
    return summary
