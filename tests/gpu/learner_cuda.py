"""The learner's GPU path on one device, without Ray: the plain PolicyLearner with DeepSpeed
(bf16 by default) running GRPO train steps on the bench-grpo policy shape.

    python tests/gpu/learner_cuda.py [--device cuda] [--dtype bf16] [--steps 5] [--policy DIR]

It needs torch, transformers, deepspeed and pydantic, and this repository on sys.path. It
does not need Ray or vLLM, so it runs wherever one GPU is. The policy is --policy, or a
22.8 M-parameter Qwen2 chat model built in a temporary directory (random init, the word
problems' tokenizer).

The batch is 64 sequences: word-problem prompts, each followed by 24 random response tokens,
with GRPO's group-normalised advantages of random 0/1 rewards (16 prompts x 4). Each step
is one optimizer step over the whole batch, with kl_coef 0.01 against the initial policy.

It prints:
- the wall time of each train step (CUDA synchronised), and their mean after the first;
- the agreement of the learner's log-probs with a fp32 transformers forward pass of the
  learner's exported weights, before and after training: max and mean |difference| over the
  response tokens (bf16 learner against fp32: expect ~1e-2; fp32 against fp32: ~1e-6).

`--device cpu --dtype fp32` runs the same path on the CPU (how it is checked without a GPU).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BENCH_MODEL = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408)


def build_policy(directory: Path) -> Path:
    import random

    from services.core.tiny_model import build_chat_qwen2, train_chat_tokenizer
    from services.core.word_problems import word_problem

    rng = random.Random(0)
    rows = [word_problem(rng) for _ in range(2000)]
    tokenizer = train_chat_tokenizer([r["question"] + "\n" + r["answer"] for r in rows] + ["system user assistant"], 512)
    model = build_chat_qwen2(tokenizer, 0, **BENCH_MODEL)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def single_process_env() -> None:
    """A torch.distributed world of one (DeepSpeed initialises one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def grpo_batch(tokenizer, learner, device_sync, prompts: int = 16, samples: int = 4, response: int = 24):
    import random

    import torch

    from services.core import rl_math
    from services.core.batch_types import pack_sequences
    from services.core.learner_batches import PolicyBatch
    from services.core.prompts import render_prompt
    from services.core.word_problems import word_problem

    rng = random.Random(1)
    generator = torch.Generator().manual_seed(1)
    prompt_ids = [render_prompt(tokenizer, word_problem(rng)["question"], tokenizer.chat_template)[1]
                  for _ in range(prompts) for _ in range(samples)]
    vocab = learner.engine.module.config.vocab_size  # the tokenizer may count an added token beyond it
    response_ids = torch.randint(0, vocab, (len(prompt_ids), response), generator=generator).tolist()
    tokens = pack_sequences(prompt_ids, response_ids, tokenizer.pad_token_id)
    rewards = torch.randint(0, 2, (len(prompt_ids),), generator=generator).float()
    advantages = rl_math.grpo_advantages(rewards, samples)[:, None] * tokens.response_mask
    old = learner.logprobs(tokens).float().cpu()
    device_sync()
    return PolicyBatch(tokens, old_logprobs=old, advantages=advantages.float(), ref_logprobs=old.clone())


def hf_agreement(policy: Path, learner, tokens, device: str) -> tuple[float, float]:
    """max and mean |learner - fp32 transformers forward of the learner's exported weights| on
    the response tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.learner.losses import per_token_logprobs

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(learner.export_weights(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied: the embedding
    model.to(device).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device),
                       use_cache=False).logits.float()
        reference = per_token_logprobs(logits, tokens.input_ids.to(device)).cpu()
    ours = learner.logprobs(tokens).float().cpu()
    mask = tokens.response_mask.bool()
    gap = (ours - reference).abs()[mask]
    return float(gap.max()), float(gap.mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--policy", help="a HF causal LM directory (default: the bench-grpo shape, random init)")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from services.core.config import FlywheelConfig
    from services.learner.losses import LossSpec
    from services.learner.policy_learner import PolicyLearner

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --dtype fp32 to check the path on the CPU")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # DeepSpeed picks its accelerator from what it sees
    single_process_env()

    def device_sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(args.policy) if args.policy else build_policy(Path(tmp) / "policy")
        cfg = FlywheelConfig.model_validate({
            "model": {"dtype": args.dtype},
            "learner": {"lr": 3e-5, "warmup_steps": 0, "micro_batch_size": 16, "zero_stage": 0},
            "algorithm": {"name": "grpo", "kl_coef": 0.01},
        })
        started = time.perf_counter()
        learner = PolicyLearner(str(policy), cfg.learner, dtype=args.dtype, total_steps=args.steps)
        device_sync()
        print(f"PolicyLearner on {args.device} ({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}), "
              f"{args.dtype}, DeepSpeed ZeRO 0: built in {time.perf_counter() - started:.1f} s; "
              f"{sum(p.numel() for p in learner.engine.module.parameters()):,} parameters")
        tokenizer = AutoTokenizer.from_pretrained(policy)
        batch = grpo_batch(tokenizer, learner, device_sync)
        spec = LossSpec.from_config(cfg, "ppo")
        gap_before = hf_agreement(policy, learner, batch.tokens, args.device)
        times = []
        for step in range(1, args.steps + 1):
            begin = time.perf_counter()
            metrics = learner.train_step(batch, spec)
            device_sync()
            times.append(time.perf_counter() - begin)
            print(f"step {step}: {times[-1]:.3f} s, loss {metrics.get('train/loss', float('nan')):.5f}, "
                  f"kl {metrics.get('train/kl', float('nan')):.2e}")
        gap_after = hf_agreement(policy, learner, batch.tokens, args.device)
    steady = times[1:] or times
    print(f"mean step after the first: {sum(steady) / len(steady):.3f} s ({len(batch.tokens.input_ids)} sequences, "
          f"{int(batch.tokens.attention_mask.sum())} tokens)")
    print(f"learner vs fp32 transformers log-probs, max / mean |diff|: before {gap_before[0]:.2e} / {gap_before[1]:.2e}, "
          f"after {args.steps} steps {gap_after[0]:.2e} / {gap_after[1]:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
