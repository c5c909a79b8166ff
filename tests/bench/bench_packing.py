"""Benchmark: sequence packing vs right-padded micro-batches, side by side in one run.

    make bench-packing    (or: .venv/bin/python tests/bench/bench_packing.py [--rows 48] [--repeats 3])

A randomly initialised Qwen2 (4 layers, hidden 256, head_dim 64, vocab 4096; fp32 on CPU)
and one batch of prompt + response sequences with a long-tailed length distribution (most
responses short, a few long, as RL rollouts are). Prints real (non-padding) tokens per second
of the learner's PPO train_step (DeepSpeed, ZeRO-0, world of one) and of the reference
server's log-probs, padded (``micro_batch_size`` rows) vs packed
(``max_tokens_per_micro_batch``), plus the tokens each path actually computes (padding
included) and the best-of-``repeats`` seconds (the two paths timed in turn). Timings only: no
assertion.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from services.core.batch_types import pack_sequences  # noqa: E402
from services.core.config import LearnerConfig, ReferenceConfig  # noqa: E402
from services.core.learner_batches import PolicyBatch  # noqa: E402
from services.core.packing import pack_bins, row_bins  # noqa: E402
from services.learner.policy_learner import PolicyLearner  # noqa: E402
from services.reference.server import ReferenceServer  # noqa: E402
from tests.loss_specs import loss_spec  # noqa: E402

VOCAB = 4096


def save_model(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=0, dtype="float32")
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def long_tailed(rows: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of 16-48 tokens; responses: 85% of 8-64 tokens, 15% of 384-768 (a long tail)."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(rows):
        n = rng.randint(384, 768) if rng.random() < 0.15 else rng.randint(8, 64)
        prompts.append([rng.randrange(1, VOCAB) for _ in range(rng.randint(16, 48))])
        responses.append([rng.randrange(1, VOCAB) for _ in range(n)])
    return prompts, responses


def alternating(repeats: int, fns: dict) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each of ``fns``, run in turn (padded, packed, padded, ...)
    so that a busy machine slows both alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def computed_tokens(lengths: list[int], bins: list[list[int]], packed: bool) -> int:
    """Token positions the model runs: the real ones packed, rows x longest row padded."""
    return sum(sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b) for b in bins)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="padded: rows per micro-batch")
    parser.add_argument("--max-tokens", type=int, default=2048, help="packed: tokens per micro-batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prompts, responses = long_tailed(args.rows, args.seed)
    tokens = pack_sequences(prompts, responses, pad_id=0)
    lengths = tokens.attention_mask.sum(dim=1).tolist()
    real = sum(lengths)
    print(f"batch: {args.rows} sequences, {real} tokens, lengths {min(lengths)}..{max(lengths)} "
          f"(median {sorted(lengths)[len(lengths) // 2]}); torch threads {torch.get_num_threads()}")
    spec = loss_spec("ppo", kl_coef=0.05)
    padded_bins = row_bins(len(lengths), args.micro_batch_size)
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])  # the reference sorts by length
    ref_padded_bins = [by_length[s : s + args.micro_batch_size] for s in range(0, len(lengths), args.micro_batch_size)]
    packed_bins = pack_bins(lengths, args.max_tokens)
    settings = {"padded": {}, "packed": {"packing": True, "max_tokens_per_micro_batch": args.max_tokens}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_model(Path(tmp) / "qwen2"))
        learners = {name: PolicyLearner(model_dir, LearnerConfig(lr=1e-5, warmup_steps=0,
                                                                 micro_batch_size=args.micro_batch_size, **extra))
                    for name, extra in settings.items()}
        old = learners["padded"].logprobs(tokens)
        learners["packed"].logprobs(tokens)  # warm-up
        g = torch.Generator().manual_seed(1)
        batch = PolicyBatch(tokens=tokens, old_logprobs=old, advantages=torch.randn(old.shape, generator=g),
                            ref_logprobs=old)
        train_s = alternating(args.repeats, {n: (lambda l=l: l.train_step(batch, spec)) for n, l in learners.items()})
        logprob_s = alternating(args.repeats, {n: (lambda l=l: l.logprobs(tokens)) for n, l in learners.items()})
        del learners
        references = {name: ReferenceServer(model_dir, ReferenceConfig(micro_batch_size=args.micro_batch_size, **extra))
                      for name, extra in settings.items()}
        for reference in references.values():
            reference.logprobs(prompts, responses)  # warm-up
        ref_s = alternating(args.repeats, {n: (lambda r=r: r.logprobs(prompts, responses)) for n, r in references.items()})
    rows = []
    for name, bins, ref_bins in (("padded", padded_bins, ref_padded_bins), ("packed", packed_bins, packed_bins)):
        packing = name == "packed"
        rows.append((name, len(bins), computed_tokens(lengths, bins, packing), computed_tokens(lengths, ref_bins, packing),
                     train_s[name], logprob_s[name], ref_s[name]))
    print(f"\n{'path':<7} {'micro':>5} {'computed':>9} {'ref_comp':>9} {'train_s':>8} {'train_tok/s':>11} "
          f"{'logp_tok/s':>10} {'ref_s':>7} {'ref_tok/s':>9}")
    for name, micro, computed, ref_computed, train_s, logprob_s, ref_s in rows:
        print(f"{name:<7} {micro:>5} {computed:>9} {ref_computed:>9} {train_s:8.2f} {real / train_s:11.0f} "
              f"{real / logprob_s:10.0f} {ref_s:7.2f} {real / ref_s:9.0f}")
    padded, packed = rows
    print(f"\npacked / padded speed-up: train_step {padded[4] / packed[4]:.2f}x, learner log-probs "
          f"{padded[5] / packed[5]:.2f}x, reference log-probs {padded[6] / packed[6]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
