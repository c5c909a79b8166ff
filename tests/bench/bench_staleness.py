"""Benchmark: streaming (max_staleness 1) against strictly on-policy (0) on the demo preset.

    .venv/bin/python tests/bench/bench_staleness.py [--steps 40] [--policy DIR] [--json PATH]

Runs grpo-toy twice on one local Ray, side by side, and prints mean step, rollout and train
seconds (steady state: the first 3 steps are dropped) and the overlap ratio
step / (rollout + learn). With staleness 1 the next rollout runs while the learner trains,
so step time should fall well under rollout + learn.
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

WARMUP = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--policy", help="an SFT policy directory (default: train one with sft-toy)")
    parser.add_argument("--json")
    args = parser.parse_args()
    from services.core.config_loading import load_config
    from services.driver.train import run_train

    with tempfile.TemporaryDirectory() as tmp:
        policy = sft_policy(f"{tmp}/sft", args.policy)
        rows = {}
        for staleness in (0, 1):
            cfg = load_config("grpo-toy", [f"model.path={policy}", f"algorithm.total_steps={args.steps}",
                                           f"algorithm.max_staleness={staleness}"])
            records = run_train(cfg, f"{tmp}/s{staleness}", progress=False)[WARMUP:]
            rows[staleness] = {
                key: mean(r[key] for r in records)
                for key in ("timing/step_s", "timing/rollout_s", "timing/learn_s", "timing/train_s", "timing/sync_s", "gold/mean")
            }
    print(f"\ngrpo-toy, {args.steps} steps (first {WARMUP} dropped), means per step")
    print(f"{'staleness':>9} {'step_s':>7} {'rollout_s':>9} {'learn_s':>8} {'train_s':>8} {'sync_s':>7} "
          f"{'step/(rollout+learn)':>21} {'gold':>6}")
    for staleness, r in rows.items():
        overlap = r["timing/step_s"] / (r["timing/rollout_s"] + r["timing/learn_s"])
        print(f"{staleness:>9} {r['timing/step_s']:7.3f} {r['timing/rollout_s']:9.3f} {r['timing/learn_s']:8.3f} "
              f"{r['timing/train_s']:8.3f} {r['timing/sync_s']:7.3f} {overlap:21.2f} {r['gold/mean']:6.3f}")
    speedup = rows[0]["timing/step_s"] / rows[1]["timing/step_s"]
    print(f"step time, staleness 0 / staleness 1: {speedup:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
