"""The SFT stage: supervised fine-tuning with DeepSpeed, loss on response tokens only.

Two modes, chosen by ``model.path``:
- null: the toy world. Train a byte-level BPE tokenizer on the toy corpus, build a tiny
  Llama from ``model.toy`` and fine-tune it on the toy SFT rows.
- a HF directory or hub id: fine-tune that causal LM on ``data.source`` rows
  (jsonl / parquet / datasets), applying the chat template when the tokenizer has one.

Writes DIR/model (a HF directory that transformers and vLLM load), DIR/metrics.jsonl and
DIR/summary.json (with before/after gold reward and exact match on the toy world).
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from pathlib import Path

from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.core.metrics import MetricsWriter
from services.core.model_files import check_model_files
from services.core.prompts import prompt_text, resolve_chat_template
from services.core.rl_math import TORCH_DTYPES
from services.core.special_tokens import load_padding_tokenizer
from services.core.tiny_model import build_toy_llama, train_toy_tokenizer
from services.core.toy_eval import evaluate_toy
from services.learner.deepspeed_setup import full_state_dict, init_engine, unpacked_stage
from services.learner.lora import reject_lora
from services.learner.sft_data import (
    IGNORE, check_response_end, collate, encode_example, sft_rows, truncation_warning,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_model_and_tokenizer(cfg: FlywheelConfig, texts_for_tokenizer: list[str] | None = None):
    """The policy to fine-tune: a fresh toy Llama, or a HF causal LM from ``model.path``."""
    from transformers import AutoModelForCausalLM

    if cfg.model.path is None:
        tokenizer = train_toy_tokenizer(texts_for_tokenizer or [], cfg.model.toy.vocab_size)
        return build_toy_llama(cfg.model.toy, tokenizer, cfg.seed), tokenizer
    path = cfg.model.path
    if not Path(path).expanduser().is_dir() and (Path(path).exists() or not _HUB_ID.match(path)):
        raise UserError(f"model.path: no model directory at '{path}'")
    dtype = TORCH_DTYPES[cfg.model.dtype]
    tokenizer = load_padding_tokenizer(path, "model.path", cfg.model.trust_remote_code)
    check_response_end(tokenizer, resolve_chat_template(tokenizer, cfg.model.chat_template))  # before the weights
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path: could not load a causal LM from '{path}': {exc}") from None
    return model, tokenizer


def response_nll(model, input_ids, attention, labels):
    """Mean negative log-likelihood over response tokens (next-token prediction)."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def run_sft(cfg: FlywheelConfig, out_dir: str | Path) -> dict:
    """Fine-tune, save DIR/model, and return the summary (also written to DIR/summary.json)."""
    import torch

    unpacked_stage(cfg.learner, "sft")
    from tqdm import tqdm

    check_model_files(cfg.model.path, "model.path")  # a damaged weight file, before OUT is written
    out = Path(out_dir)
    started = time.time()
    rows = sft_rows(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg, [prompt_text(r["prompt"]) + r["response"] for r in rows])
    out.mkdir(parents=True, exist_ok=True)  # after the checks of the rows and the model
    template = resolve_chat_template(tokenizer, cfg.model.chat_template)
    if template is not None:
        tokenizer.chat_template = template  # saved with the model: RL and vLLM then prompt it the same way
    truncated = {"prompt": 0, "response": 0}
    examples = [
        encode_example(
            tokenizer, r["prompt"], r["response"], cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, truncated,
            chat_template=template, system_prompt=cfg.data.system_prompt,
        )
        for r in rows
    ]
    warning = truncation_warning(truncated, len(rows), cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)
    if warning:
        print(warning, file=sys.stderr)
    toy = cfg.data.source == "toy"
    summary: dict = {"rows": len(rows), "parameters": sum(p.numel() for p in model.parameters())}
    if toy and cfg.data.eval_prompts:
        summary["before"] = evaluate_toy(model, tokenizer, cfg)

    micro, accum = cfg.learner.micro_batch_size, cfg.learner.grad_accum_steps
    micro_steps_per_epoch = math.ceil(len(examples) / micro)
    total_steps = max(1, micro_steps_per_epoch * cfg.learner.epochs // accum)
    reject_lora(cfg.learner, "sft")
    engine = init_engine(model, cfg.learner, cfg.model.dtype, total_steps)
    rng = random.Random(cfg.seed)
    step = 0
    with MetricsWriter(out / "metrics.jsonl") as metrics, tqdm(
        total=micro_steps_per_epoch * cfg.learner.epochs, desc="sft", unit="batch", mininterval=2.0
    ) as bar:
        for epoch in range(cfg.learner.epochs):
            order = list(range(len(examples)))
            if cfg.data.shuffle:
                rng.shuffle(order)
            for start in range(0, len(order), micro):
                batch = collate([examples[i] for i in order[start : start + micro]], tokenizer.pad_token_id)
                input_ids, attention, labels = (t.to(engine.device) for t in batch)
                loss = response_nll(engine, input_ids, attention, labels)
                engine.backward(loss)
                engine.step()
                bar.update(1)
                if engine.global_steps > step:  # an optimizer step happened
                    step = engine.global_steps
                    epochs = f"{epoch + 1}/{cfg.learner.epochs}"  # shown 1-based; metrics' "epoch" counts from 0
                    bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epochs, refresh=False)
                    metrics.write({
                        "step": step,
                        "epoch": epoch,
                        "train/loss": loss.item(),
                        "train/lr": engine.get_lr()[0],
                        "timing/elapsed_s": time.time() - started,
                    })
    state = full_state_dict(engine)
    model_dir = out / "model"
    engine.module.save_pretrained(model_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    summary["train_s"] = round(time.time() - started, 1)
    summary["final_loss"] = loss.item()
    if toy and cfg.data.eval_prompts:
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        summary["after"] = evaluate_toy(trained, tokenizer, cfg)
    summary["total_s"] = round(time.time() - started, 1)
    summary["model_dir"] = str(model_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
