"""Evaluation of a policy on the toy world's held-out prompts (transformers generate).

Responses are sampled at temperature 1 with a fixed seed: that is the distribution RL
optimises, and greedy decoding of a list policy stops after its single likeliest word.
"""

from __future__ import annotations

import functools
from statistics import mean

from services.core import toy_world
from services.core.config import FlywheelConfig
from services.core.special_tokens import load_padding_tokenizer

EVAL_SEED_OFFSET = 777  # eval prompts are drawn apart from the SFT prompts


@functools.lru_cache(maxsize=1)
def load_sampling_policy(policy_dir: str):
    """(model, tokenizer) of a saved policy for sampling with :func:`generate`, fp32, pad
    token set; cached, so the callers sampling one policy in turn load it once."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_padding_tokenizer(policy_dir, "model.path")
    return AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32), tokenizer


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 64) -> list[str]:
    import torch

    torch.manual_seed(seed)
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(
                    **enc.to(model.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = out[:, enc.input_ids.shape[1] :]
            completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return completions


def evaluate_toy(model, tokenizer, cfg: FlywheelConfig) -> dict[str, float]:
    """Mean gold reward on the preference task and exact match on arithmetic (sampled, T=1)."""
    results: dict[str, float] = {}
    for name in cfg.data.toy_tasks:
        task = toy_world.TASKS[name]
        prompts = [p.prompt for p in task.prompts(cfg.data.eval_prompts, cfg.seed + EVAL_SEED_OFFSET)]
        completions = generate(model, tokenizer, prompts, cfg.data.max_response_tokens, seed=cfg.seed)
        rewards = task.reward(prompts, completions)
        key = "eval/gold_reward_mean" if name == "preference" else "eval/arith_exact_match"
        results[key] = round(mean(rewards), 4)
        results[f"eval/{name}_response_words"] = round(mean(len(c.split()) for c in completions), 2)
    return results
