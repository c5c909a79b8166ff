"""Benchmark: time to first step of `flywheel train grpo-toy`, this checkout against an earlier commit.

    .venv/bin/python tests/bench/bench_time_to_first_step.py [--before REV] [--repeats 2]
                                                            [--policy DIR] [--json PATH]

Both run from this venv, one after the other (alternating, ``--repeats`` times each): the
earlier commit from a git worktree of ``--before`` (default: the commit before issue #17's
changes), this checkout as it is. Each run is `flywheel train grpo-toy --out D
model.path=<toy SFT policy> algorithm.total_steps=3` in its own process, timed from the
process start to the moment its first metrics.jsonl record (the end of step 1) appears, and
to the process's exit. The issue's target: at most 30 s to the end of step 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.checkouts import BEFORE_17, REPO, flywheel, worktree  # noqa: E402
from tests.conftest import sft_policy  # noqa: E402

TARGET_S = 30.0
POLL_S = 0.05


def timed_run(tree: Path, policy: str, out: Path, log: Path) -> dict:
    """One `flywheel train` from ``tree`` (its ``services`` first on the path), timed."""
    command, env = flywheel(tree, "train", "grpo-toy", "--out", str(out), f"model.path={policy}",
                            "algorithm.total_steps=3")
    metrics = out / "metrics.jsonl"
    with log.open("w") as sink:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=tree, env=env, stdout=sink, stderr=subprocess.STDOUT)
        first_step_s = None
        while proc.poll() is None:
            if first_step_s is None and metrics.is_file() and metrics.read_text().strip():
                first_step_s = time.perf_counter() - started
            time.sleep(POLL_S)
        total_s = time.perf_counter() - started
    if proc.returncode != 0 or first_step_s is None:
        raise RuntimeError(f"flywheel train from {tree} failed (exit {proc.returncode}); see {log}")
    first = json.loads(metrics.read_text().splitlines()[0])
    return {"first_step_end_s": first_step_s, "total_s": total_s, "step1_s": first["timing/step_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE_17, help=f"the earlier commit (default {BEFORE_17}: before #17)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policy", help="a toy SFT policy directory (default: train one with sft-toy)")
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with worktree(args.before, tmp / "before") as before:
            policy = sft_policy(tmp / "sft", args.policy)
            runs: dict[str, list[dict]] = {"before": [], "now": []}
            for repeat in range(args.repeats):
                for label, tree in (("before", before), ("now", REPO)):
                    out = tmp / f"{label}-{repeat}"
                    runs[label].append(timed_run(tree, policy, out, tmp / f"{label}-{repeat}.log"))
                    print(f"{label} #{repeat + 1}: {runs[label][-1]}", flush=True)
    print(f"\ntime to first step, `flywheel train grpo-toy` (3 steps), {args.repeats} runs each, alternating; "
          f"before = {args.before}, now = this checkout")
    print(f"{'code':>7} {'step 1 ended at (s)':>22} {'median':>7} {'step 1 itself (s)':>20} {'command (s)':>14} "
          f"{'target <= 30 s':>15}")
    medians = {}
    for label, rows in runs.items():
        ends = [r["first_step_end_s"] for r in rows]
        medians[label] = statistics.median(ends)
        ends_text = ", ".join(f"{e:.1f}" for e in ends)
        step1_text = ", ".join(f"{r['step1_s']:.2f}" for r in rows)
        total_text = ", ".join(f"{r['total_s']:.1f}" for r in rows)
        print(f"{label:>7} {ends_text:>22} {medians[label]:7.1f} {step1_text:>20} {total_text:>14} "
              f"{'met' if medians[label] <= TARGET_S else 'NOT met':>15}")
    print(f"before / now: {medians['before'] / medians['now']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"before": args.before, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
