"""Benchmark: on-policy against streaming with max_staleness 1 and 4, side by side in one run.

    .venv/bin/python tests/bench/bench_async.py [--steps 30] [--seed 0] [--runs sync,s1,s4,s4-tis] [--work DIR]

The workload of tests/bench/bench_algorithms.py (`flywheel example`, its chat model SFT-ed by
`sft-chat`, then grpo-math: 16 prompts x 4 samples per step, math_verify reward) with only
``algorithm.max_staleness`` changed (and, for ``s4-tis``, ``algorithm.tis_cap=2``: the
decoupled objective). Every run trains the same number of steps, so on the same number of
samples, and evaluates the held-out split (pass@1 of 48 problems x 4 samples) before the
first step and after the last.

Prints per run: steps per minute over the whole training loop (the first step, which waits
for the first rollout in every mode, included; the evaluations excluded), the median step,
the median time a step waited for its batch, held-out pass@1 before and after, and the mean
reward of the last 3 steps. The runs share the machine's cores one after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.bench_algorithms import config_for, flywheel, prepare  # noqa: E402

RUNS = {
    "sync": ["algorithm.max_staleness=0"],
    "s1": ["algorithm.max_staleness=1"],
    "s4": ["algorithm.max_staleness=4"],
    "s4-tis": ["algorithm.max_staleness=4", "algorithm.tis_cap=2"],
}


def run(label: str, steps: int, example: Path, policy: Path, work: Path, seed: int) -> dict:
    out = work / "runs" / f"async-{label}-seed{seed}-{int(time.time())}"
    flywheel("train", str(config_for("grpo", steps, work, seed)), "--out", str(out), f"model.path={policy}",
             f"data.source={example / 'train.jsonl'}", f"data.eval_source={example / 'test.jsonl'}",
             "eval.max_prompts=48", *RUNS[label])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/pass@1"] for r in records if "eval/pass@1" in r}
    trained = [r for r in records if r["step"] >= 1]
    loop_s = sum(r["timing/step_s"] - r.get("timing/eval_s", 0.0) for r in trained)
    return {
        "steps_per_min": 60 * len(trained) / loop_s, "step_s": median(r["timing/step_s"] for r in trained[1:]
                                                                      if "eval/pass@1" not in r),
        "wait_s": median(r.get("timing/rollout_wait_s", r["timing/rollout_s"]) for r in trained[1:]),
        "staleness": max(r["rollout/staleness_max"] for r in trained),
        "before": evals.get(0), "after": evals.get(steps),
        "reward": sum(r["reward/mean"] for r in trained[-3:]) / len(trained[-3:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--work", type=Path, default=None, help="keeps the example and SFT policy (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-async-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workload in {work}", flush=True)
    example, policy = prepare(work)
    rows = {}
    for label in args.runs.split(","):
        rows[label] = run(label, args.steps, example, policy, work, args.seed)
        print(f"  {label}: {rows[label]}", flush=True)
    sync = rows.get("sync")
    print(f"\ngrpo-math, {args.steps} steps x 64 samples, seed {args.seed}; pass@1: 48 held-out problems x 4 samples")
    print(f"{'run':<10}{'steps/min':>10}{'vs sync':>9}{'median step s':>15}{'median wait s':>15}{'max stale':>11}"
          f"{'pass@1 before':>15}{'pass@1 after':>14}{'reward last 3':>15}")
    for label, r in rows.items():
        ratio = f"{r['steps_per_min'] / sync['steps_per_min']:.2f}x" if sync else "-"
        print(f"{label:<10}{r['steps_per_min']:>10.1f}{ratio:>9}{r['step_s']:>15.2f}{r['wait_s']:>15.2f}"
              f"{r['staleness']:>11}{r['before']:>15.3f}{r['after']:>14.3f}{r['reward']:>15.3f}")


if __name__ == "__main__":
    main()
