"""Benchmark: GRPO with and without reward-variance prompt selection (Razin et al. 2025).

    .venv/bin/python tests/bench/bench_variance_selection.py [--steps 60] [--prompts 64] [--policy DIR]
        [--json PATH] [KEY=VALUE ...]   # e.g. 'reward.scorers=[{kind: toy_gold}]' for a noiseless reward

Runs grpo-toy twice on one local Ray with the same seed and budget: prompts drawn each once
per epoch (``sequential``) and drawn by their latest reward variance (``reward_variance``).
It prints, side by side, the held-out gold reward of each final policy (128 toy prompts the
runs never trained on, sampled at T = 1), the mean per-prompt reward variance of the batches
and the share of prompts whose reward variance was below the threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import sft_policy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=64, help="toy prompt pool (small, so prompts recur)")
    parser.add_argument("--policy", help="an SFT policy directory (default: train one with sft-toy)")
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra config overrides for both runs")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.core.config_loading import load_config
    from services.driver.train import run_train
    from services.core.toy_eval import evaluate_toy

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy = sft_policy(f"{tmp}/sft", args.policy)
        for selection in ("sequential", "reward_variance"):
            cfg = load_config("grpo-toy", [
                f"model.path={policy}", f"algorithm.total_steps={args.steps}", f"data.toy_size={args.prompts}",
                f"data.selection={selection}", *args.overrides,
            ])
            records = run_train(cfg, f"{tmp}/{selection}", progress=False)
            final = f"{tmp}/{selection}/policy"
            held_out = evaluate_toy(
                AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32), AutoTokenizer.from_pretrained(final), cfg
            )["eval/gold_reward_mean"]
            rows[selection] = {
                "heldout_gold": held_out,
                "rollout_gold_last10": mean(r["gold/mean"] for r in records[-10:]),
                "reward_var_mean": mean(r["reward/var_mean"] for r in records),
                "reward_var_frac_below": mean(r["reward/var_frac_below"] for r in records),
            }
    print(f"\ngrpo-toy, {args.steps} steps, {args.prompts} toy prompts, same seed")
    print(f"{'selection':>16} {'held-out gold':>14} {'rollout gold (last 10)':>23} {'reward var':>11} {'var < thr':>10}")
    for selection, r in rows.items():
        print(f"{selection:>16} {r['heldout_gold']:14.3f} {r['rollout_gold_last10']:23.3f} "
              f"{r['reward_var_mean']:11.4f} {r['reward_var_frac_below']:10.3f}")
    gain = rows["reward_variance"]["heldout_gold"] - rows["sequential"]["heldout_gold"]
    print(f"held-out gold, reward_variance minus sequential: {gain:+.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
