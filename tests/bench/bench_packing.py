"""Benchmark: sequence packing vs right-padded micro-batches, side by side in one run.

    make bench-packing    (or: .venv/bin/python tests/bench/bench_packing.py [--max-tokens 1024 2048] [--repeats 3])

A randomly initialised Qwen2 (4 layers, hidden 256, head_dim 64, vocab 4096; fp32 on CPU)
and one batch of prompt + response sequences with a long-tailed length distribution (most
responses short, a few long, as RL rollouts are). Prints real (non-padding) tokens per second
of the learner's PPO train_step (DeepSpeed, ZeRO-0, world of one) and of the reference
server's log-probs, padded (``micro_batch_size`` rows) vs packed
(``max_tokens_per_micro_batch``, one path per budget), the token positions each path runs
(padding included) and the query x key pairs its attention scores (a packed row of L tokens
scores L^2 pairs: the block-diagonal mask is dense with sdpa and eager), and best-of-``repeats``
seconds, the paths timed in turn. Timings only: no assertion.
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


def alternating(repeats: int, fns: dict) -> dict[str, tuple[float, float]]:
    """Best-of-``repeats`` (wall seconds, CPU seconds of this process) of each of ``fns``, run
    in turn (padded, packed, padded, ...) so that a busy machine slows them alike. On a shared
    machine the CPU seconds at ``--threads 1`` measure the work itself best."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def computed(lengths: list[int], bins: list[list[int]], packed: bool) -> tuple[int, int]:
    """(token positions the model runs, query x key pairs its attention scores): packed, the
    real tokens and L^2 per packed row (the block-diagonal mask is dense); padded, rows x
    longest row and rows x longest^2."""
    tokens = attention = 0
    for b in bins:
        total, longest = sum(lengths[i] for i in b), max(lengths[i] for i in b)
        tokens += total if packed else len(b) * longest
        attention += total**2 if packed else len(b) * longest**2
    return tokens, attention


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="padded: rows per micro-batch")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1024, 2048],
                        help="packed: tokens per micro-batch (one packed path per budget)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts, responses = long_tailed(args.rows, args.seed)
    tokens = pack_sequences(prompts, responses, pad_id=0)
    lengths = tokens.attention_mask.sum(dim=1).tolist()
    real = sum(lengths)
    print(f"batch: {args.rows} sequences, {real} tokens, lengths {min(lengths)}..{max(lengths)} "
          f"(median {sorted(lengths)[len(lengths) // 2]}); torch threads {torch.get_num_threads()}")
    spec = loss_spec("ppo", kl_coef=0.05)
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])  # the reference sorts by length
    step = args.micro_batch_size
    paths = {"padded": ({}, row_bins(len(lengths), step), [by_length[s : s + step] for s in range(0, len(lengths), step)])}
    for budget in args.max_tokens:
        bins = pack_bins(lengths, budget)
        paths[f"packed {budget}"] = ({"packing": True, "max_tokens_per_micro_batch": budget}, bins, bins)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_model(Path(tmp) / "qwen2"))
        learners = {name: PolicyLearner(model_dir, LearnerConfig(lr=1e-5, warmup_steps=0, micro_batch_size=step, **extra))
                    for name, (extra, _, _) in paths.items()}
        if args.threads:
            torch.set_num_threads(args.threads)
        old = learners["padded"].logprobs(tokens)
        for learner in learners.values():
            learner.logprobs(tokens)  # warm-up
        g = torch.Generator().manual_seed(1)
        batch = PolicyBatch(tokens=tokens, old_logprobs=old, advantages=torch.randn(old.shape, generator=g),
                            ref_logprobs=old)
        train_s = alternating(args.repeats, {n: (lambda l=l: l.train_step(batch, spec)) for n, l in learners.items()})
        logprob_s = alternating(args.repeats, {n: (lambda l=l: l.logprobs(tokens)) for n, l in learners.items()})
        del learners
        references = {name: ReferenceServer(model_dir, ReferenceConfig(micro_batch_size=step, **extra))
                      for name, (extra, _, _) in paths.items()}
        if args.threads:  # a ReferenceServer sets torch's threads from reference.resources
            torch.set_num_threads(args.threads)
        for reference in references.values():
            reference.logprobs(prompts, responses)  # warm-up
        ref_s = alternating(args.repeats, {n: (lambda r=r: r.logprobs(prompts, responses)) for n, r in references.items()})
    print(f"\n{'path':<12} {'micro':>5} {'tokens':>7} {'attn_M':>7} {'ref_tokens':>10} {'ref_attn_M':>10}")
    for name, (extra, bins, ref_bins) in paths.items():
        (run, attn), (ref_run, ref_attn) = computed(lengths, bins, bool(extra)), computed(lengths, ref_bins, bool(extra))
        print(f"{name:<12} {len(bins):>5} {run:>7} {attn / 1e6:7.2f} {ref_run:>10} {ref_attn / 1e6:10.2f}")
    timed = {"train_step": train_s, "learner log-probs": logprob_s, "reference log-probs": ref_s}
    print(f"\nreal tokens per second, wall (per CPU-second of this process); best of {args.repeats}")
    print(f"{'path':<12}" + "".join(f" {what:>26}" for what in timed))
    for name in paths:
        print(f"{name:<12}" + "".join(f" {real / t[name][0]:>13.0f} ({real / t[name][1]:>8.0f})" for t in timed.values()))
    print("\npacked / padded speed-up, wall (CPU):")
    for name in list(paths)[1:]:
        print(f"  {name}: " + ", ".join(f"{what} {t['padded'][0] / t[name][0]:.2f}x ({t['padded'][1] / t[name][1]:.2f}x)"
                                      for what, t in timed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
