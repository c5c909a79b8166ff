"""Benchmark: partial rollouts on against off on a long-tailed length distribution, side by side.

    .venv/bin/python tests/bench/bench_partial.py [--steps 12] [--pieces 16] [--mean-length 24] [--work DIR]

The policy is `flywheel example`'s Qwen2 (256 positions), rewired so that its response
lengths are geometric: embeddings get a large shared component u, the output head is untied
and zero but for the EOS row (a multiple of u). Every position then puts the same probability
p = 1 / mean-length on EOS and spreads the rest evenly, so of 64 samples a few run several times
the mean: the long tail that makes a batch's rollout wait for its longest response. The run is
grpo-math's (16 prompts x 4 samples, math_verify) with rollout.max_tokens 192; the reward is 0
on these responses, so the policy hardly moves and the lengths stay geometric through the run.

Runs, one after the other: ``max_staleness 2`` without and with ``rollout.partial_tokens``
(pieces of --pieces tokens). Prints trained samples and trained response tokens per minute
over the loop (a partial run's step trains the groups that finished, so its batch size
varies, and early on it trains the short ones first), steps per minute, the rollout's own
generated tokens per second, the median rollout and wait per step, and the share of trained
responses that spanned two versions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.bench_algorithms import config_for, flywheel  # noqa: E402


def long_tail_policy(model_dir: Path, out: Path, mean_length: float, scale: float = 20.0) -> Path:
    """``model_dir``'s model with geometric response lengths of mean ``mean_length`` (see the module)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    u = torch.where(torch.rand(hidden, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)  # rms 1
    p = 1.0 / mean_length
    logit = math.log(p * (vocab - 1) / (1 - p))  # EOS against vocab - 1 zero logits
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings += scale * u  # the residual stream is ~ scale * u everywhere: the final norm gives ~ u
        head = torch.nn.Linear(hidden, vocab, bias=False)
        head.weight.zero_()
        head.weight[tokenizer.eos_token_id] = logit * u / hidden
    model.config.tie_word_embeddings = False
    model.lm_head = head
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(label: str, steps: int, example: Path, policy: Path, work: Path, extra: list[str]) -> dict:
    out = work / "runs" / f"partial-{label}-{int(time.time())}"
    flywheel("train", str(config_for("grpo", steps, work)), "--out", str(out), f"model.path={policy}",
             f"data.source={example / 'train.jsonl'}", "data.eval_source=null", "algorithm.eval_every=0",
             "rollout.max_tokens=192", "algorithm.max_staleness=2", *extra)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["step"] >= 1]
    loop_s = sum(r["timing/step_s"] for r in trained)
    return {
        "samples_per_min": 60 * sum(r["rollout/trajectories"] for r in trained) / loop_s,
        "tokens_per_min": 60 * sum(r["rollout/trajectories"] * r["rollout/response_length_mean"] for r in trained)
        / loop_s,
        "generated_per_s": median(r["perf/generated_tokens_per_s"] for r in trained[1:]),
        "steps_per_min": 60 * len(trained) / loop_s,
        "rollout_s": median(r["timing/rollout_s"] for r in trained[1:]),
        "wait_s": median(r["timing/rollout_wait_s"] for r in trained[1:]),
        "length": sum(r["rollout/response_length_mean"] for r in trained) / len(trained),
        "continued": sum(r.get("rollout/partial_continued_fraction", 0.0) for r in trained) / len(trained),
        "staleness": max(r["rollout/staleness_max"] for r in trained),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--pieces", type=int, default=16, help="rollout.partial_tokens of the partial run")
    parser.add_argument("--mean-length", type=float, default=24.0)
    parser.add_argument("--work", type=Path, default=None, help="keeps the example (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-partial-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workload in {work}", flush=True)
    example = work / "example"
    if not (example / "train.jsonl").is_file():
        flywheel("example", str(example), "--train", "2000", "--test", "100", "--max-number", "10")
    policy = long_tail_policy(example / "model", work / f"long-tail-{args.mean_length:g}", args.mean_length)
    rows = {
        "whole": run("whole", args.steps, example, policy, work, []),
        f"pieces of {args.pieces}": run("pieces", args.steps, example, policy, work,
                                        [f"rollout.partial_tokens={args.pieces}"]),
    }
    base = rows["whole"]
    print(f"\ngrpo-math on a geometric-length policy (mean {args.mean_length:g} tokens, max_tokens 192), "
          f"{args.steps} steps, max_staleness 2")
    print(f"{'rollouts':<16}{'samples/min':>12}{'vs whole':>10}{'trained tok/min':>16}{'vs whole':>10}"
          f"{'steps/min':>11}{'rollout tok/s':>15}{'median rollout s':>18}{'median wait s':>15}{'mean length':>13}"
          f"{'continued':>11}{'max stale':>11}")
    for label, r in rows.items():
        print(f"{label:<16}{r['samples_per_min']:>12.0f}{r['samples_per_min'] / base['samples_per_min']:>9.2f}x"
              f"{r['tokens_per_min']:>16.0f}{r['tokens_per_min'] / base['tokens_per_min']:>9.2f}x"
              f"{r['steps_per_min']:>11.1f}{r['generated_per_s']:>15.0f}{r['rollout_s']:>18.2f}{r['wait_s']:>15.2f}"
              f"{r['length']:>13.1f}{r['continued']:>11.2f}{r['staleness']:>11}")


if __name__ == "__main__":
    main()
