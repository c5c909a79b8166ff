"""Benchmark: toy-world SFT wall time per ZeRO stage, measured side by side in one run.

    make bench        (or: .venv/bin/python tests/bench/bench_sft.py [--stages 0 2 3])

Prints seconds per stage, the ratio to ZeRO-0 and the gold / exact-match figures; the
issue's target is the full preset under 180 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import run_flywheel  # noqa: E402

TARGET_S = 180.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    args = parser.parse_args()
    rows = []
    for stage in args.stages:
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            proc = run_flywheel("sft", "sft-toy", "--out", out, f"learner.zero_stage={stage}")
            wall = time.perf_counter() - started
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                return 1
            summary = json.loads((Path(out) / "summary.json").read_text())
        rows.append((stage, wall, summary))
    base = rows[0][1]
    print(f"\n{'zero':>4} {'wall_s':>8} {'train_s':>8} {'vs_first':>8} {'gold':>7} {'exact':>7}  target<{TARGET_S:.0f}s")
    for stage, wall, s in rows:
        print(
            f"{stage:>4} {wall:8.1f} {s['train_s']:8.1f} {wall / base:8.2f} "
            f"{s['after']['eval/gold_reward_mean']:7.3f} {s['after']['eval/arith_exact_match']:7.3f}  "
            f"{'ok' if wall < TARGET_S else 'SLOW'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
