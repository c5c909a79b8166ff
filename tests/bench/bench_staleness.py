"""Benchmark: streaming (max_staleness 1) against strictly on-policy (0) on grpo-toy, this checkout and an earlier commit.

    .venv/bin/python tests/bench/bench_staleness.py [--steps 40] [--before REV | --no-before]
                                                   [--policy DIR] [--json PATH]

Runs `flywheel train grpo-toy` with staleness 0 and 1, from this checkout and from a git
worktree of ``--before`` (default: the commit before issue #17's changes), one after the
other on the same machine, and prints mean step, rollout, learn (scoring + training) and
sync seconds per step (steady state: the first 3 steps are dropped).

The overlap figure is issue #17's target: with staleness 1 the next rollout runs while the
learner scores and trains, so a step should take at most 1.1 x max(rollout, learn + sync),
the two sides' times measured apart in the on-policy run of the same code (in the streaming
run both sides share the CPU cores, and each one's own time grows).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.checkouts import BEFORE_17, REPO, flywheel, worktree  # noqa: E402
from tests.conftest import sft_policy  # noqa: E402

WARMUP = 3
TARGET = 1.1
KEYS = ("timing/step_s", "timing/rollout_s", "timing/learn_s", "timing/sync_s", "gold/mean")


def train(tree: Path, policy: str, steps: int, staleness: int, out: Path) -> dict:
    command, env = flywheel(tree, "train", "grpo-toy", "--out", str(out), f"model.path={policy}",
                            f"algorithm.total_steps={steps}", f"algorithm.max_staleness={staleness}")
    with (out.parent / f"{out.name}.log").open("w") as log:
        proc = subprocess.run(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"flywheel train from {tree} failed (exit {proc.returncode}); see {out.parent}/{out.name}.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {key: mean(r[key] for r in records[WARMUP:]) for key in KEYS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--before", default=BEFORE_17, help=f"the earlier commit (default {BEFORE_17}: before #17)")
    parser.add_argument("--no-before", action="store_true", help="this checkout only")
    parser.add_argument("--policy", help="a toy SFT policy directory (default: train one with sft-toy)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        policy = sft_policy(tmp / "sft", args.policy)

        def measure(label: str, tree: Path) -> None:
            rows[label] = {s: train(tree, policy, args.steps, s, tmp / f"{label}-s{s}") for s in (0, 1)}

        if args.no_before:
            measure("now", REPO)
        else:
            with worktree(args.before, tmp / "before") as before:
                measure("before", before)
                measure("now", REPO)
    print(f"\ngrpo-toy, {args.steps} steps (first {WARMUP} dropped), means per step; "
          f"before = {args.before}, now = this checkout")
    print(f"{'code':>6} {'staleness':>9} {'step_s':>7} {'rollout_s':>9} {'learn_s':>8} {'sync_s':>7} {'gold':>6}")
    for label, by_staleness in rows.items():
        for staleness, r in by_staleness.items():
            print(f"{label:>6} {staleness:>9} {r['timing/step_s']:7.3f} {r['timing/rollout_s']:9.3f} "
                  f"{r['timing/learn_s']:8.3f} {r['timing/sync_s']:7.3f} {r['gold/mean']:6.3f}")
    for label, by_staleness in rows.items():
        apart, streaming = by_staleness[0], by_staleness[1]
        bound = max(apart["timing/rollout_s"], apart["timing/learn_s"] + apart["timing/sync_s"])
        ratio = streaming["timing/step_s"] / bound
        print(f"{label}: streaming step {streaming['timing/step_s']:.3f} s / max(rollout, learn + sync) of the "
              f"on-policy run {bound:.3f} s = {ratio:.2f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'}); "
              f"step time, staleness 0 / 1: {apart['timing/step_s'] / streaming['timing/step_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
