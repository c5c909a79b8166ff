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

from services.core import toy_world
from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.core.metrics import MetricsWriter

IGNORE = -100
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_model_and_tokenizer(cfg: FlywheelConfig, texts_for_tokenizer: list[str] | None = None):
    """The policy to fine-tune: a fresh toy Llama, or a HF causal LM from ``model.path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.core.rl_math import TORCH_DTYPES
    from services.core.tiny_model import build_toy_llama, train_toy_tokenizer

    if cfg.model.path is None:
        tokenizer = train_toy_tokenizer(texts_for_tokenizer or [], cfg.model.toy.vocab_size)
        return build_toy_llama(cfg.model.toy, tokenizer, cfg.seed), tokenizer
    path = cfg.model.path
    if not Path(path).expanduser().is_dir() and (Path(path).exists() or not _HUB_ID.match(path)):
        raise UserError(f"model.path: no model directory at '{path}'")
    dtype = TORCH_DTYPES[cfg.model.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path: could not load a causal LM from '{path}': {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def encode_example(tokenizer, prompt: str, response: str, max_prompt: int, max_response: int,
                   truncated: dict[str, int] | None = None):
    """Token ids and labels (IGNORE on the prompt) for one prompt/response pair. A prompt
    over ``max_prompt`` tokens keeps its last ones, a response over ``max_response`` its
    first ones; ``truncated`` (``{"prompt": 0, "response": 0}``) counts them."""
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        full_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        if full_text.startswith(prompt_text):
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
            response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False).input_ids
            return _truncate(prompt_ids, response_ids, max_prompt, max_response, truncated)
    prompt_ids = tokenizer(prompt).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return _truncate(prompt_ids, response_ids, max_prompt, max_response, truncated)


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


def response_nll(model, input_ids, attention, labels):
    """Mean negative log-likelihood over response tokens (next-token prediction)."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def sft_rows(cfg: FlywheelConfig) -> list[dict[str, str]]:
    if cfg.data.source == "toy":
        return toy_world.sft_corpus(cfg.data.toy_tasks, cfg.data.toy_size, cfg.seed)
    from services.core.data import load_rows

    keys = [cfg.data.prompt_key, cfg.data.response_key]
    rows = load_rows(
        cfg.data.source,
        keys,
        split=cfg.data.split,
        key_fields={cfg.data.prompt_key: "data.prompt_key", cfg.data.response_key: "data.response_key"},
    )
    return [{"prompt": r[keys[0]], "response": r[keys[1]]} for r in rows]


def run_sft(cfg: FlywheelConfig, out_dir: str | Path) -> dict:
    """Fine-tune, save DIR/model, and return the summary (also written to DIR/summary.json)."""
    import torch
    from tqdm import tqdm

    from services.learner.deepspeed_setup import full_state_dict, init_engine
    from services.learner.toy_eval import evaluate_toy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = sft_rows(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg, [r["prompt"] + r["response"] for r in rows])
    truncated = {"prompt": 0, "response": 0}
    examples = [
        encode_example(
            tokenizer, r["prompt"], r["response"], cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, truncated
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
                    bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch, refresh=False)
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
