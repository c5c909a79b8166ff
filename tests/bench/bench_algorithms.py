"""Benchmark: every policy-gradient algorithm on the same workload and budget, side by side.

    .venv/bin/python tests/bench/bench_algorithms.py [--steps 30] [--seed 0] [--algorithms grpo,gspo,...] [--work DIR]

The real-datasets workload of tests/e2e/test_rl_on_files.py: `flywheel example` (2,000
GSM8K-format word problems with addends up to 10, its Qwen2 chat model), `flywheel sft
sft-chat` on them, then `flywheel train grpo-math` with ``algorithm.name`` set to each
algorithm in turn, the same seed, prompts, steps and learning rate. Each run evaluates the
held-out split (pass@1 of 48 problems x 4 samples) before the first step and after the last.
Each run's algorithm section is grpo-math's with only ``name``: GSPO, DAPO and REINFORCE++
get their published defaults (no KL for GSPO and DAPO; the KL in the reward for
REINFORCE++), GRPO, Dr. GRPO and RLOO the preset's KL loss (0.01, k3); DAPO also gets its
soft overlong penalty (8 tokens of 32), online IPO a Bradley-Terry preference over the
math_verify reward (temperature 0.5), and so does Nash-MD (mixture 0.5, the preset's KL).

Prints one row per algorithm: median step time (steps 2.. without an evaluation), held-out
pass@1 before and after, the mean reward of the last 3 steps, and DAPO's refills. ``--work``
keeps the example and the SFT policy for another run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[2]
FLYWHEEL = [sys.executable, "-m", "services.cli"]
ALGORITHMS = ["grpo", "gspo", "dapo", "dr_grpo", "rloo", "reinforce_pp_baseline", "reinforce_pp", "online_ipo",
              "nash_md"]
PRESET_KL = {"kl_coef": 0.01, "kl_estimator": "k3"}  # grpo-math's, for the algorithms without published values
ALGORITHM_SETTINGS = {"grpo": PRESET_KL, "dr_grpo": PRESET_KL, "rloo": PRESET_KL, "online_ipo": {"dpo_beta": 0.1},
                      "nash_md": PRESET_KL}
OVERRIDES = {
    "dapo": ["reward.overlong_buffer=8"],
    "reinforce_pp": ["rollout.n_samples=1", "rollout.prompts_per_step=64"],  # the same samples per step
    "online_ipo": ["reward.preference={kind: bt, temperature: 0.5}"],
    "nash_md": ["reward.preference={kind: bt, temperature: 0.5}"],
}


def config_for(name: str, steps: int, work: Path, seed: int = 0) -> Path:
    """grpo-math with its algorithm section replaced: ``name``, the steps, an evaluation
    before and after, and only the settings the algorithm reads beyond its published defaults."""
    import yaml

    cfg = yaml.safe_load((REPO / "services" / "presets" / "grpo-math.yaml").read_text())
    cfg["seed"] = seed
    cfg["algorithm"] = {"name": name, "total_steps": steps, "eval_every": steps, "max_staleness": 0,
                        **ALGORITHM_SETTINGS.get(name, {})}
    path = work / "configs" / f"{name}-seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def flywheel(*args: str) -> None:
    started = time.perf_counter()
    proc = subprocess.run([*FLYWHEEL, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"flywheel {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  flywheel {args[0]} {args[1]}: {time.perf_counter() - started:.0f} s", flush=True)


def prepare(work: Path) -> tuple[Path, Path]:
    example, sft = work / "example", work / "sft"
    if not (example / "train.jsonl").is_file():
        flywheel("example", str(example), "--train", "2000", "--test", "100", "--max-number", "10")
    if not (sft / "model" / "config.json").is_file():
        flywheel("sft", "sft-chat", "--out", str(sft), "--overwrite", f"model.path={example / 'model'}",
                 f"data.source={example / 'train.jsonl'}")
    return example, sft / "model"


def run(name: str, steps: int, example: Path, policy: Path, out: Path, seed: int = 0) -> dict:
    flywheel("train", str(config_for(name, steps, out.parent.parent, seed)), "--out", str(out), f"model.path={policy}",
             f"data.source={example / 'train.jsonl'}", f"data.eval_source={example / 'test.jsonl'}",
             "eval.max_prompts=48", *OVERRIDES.get(name, []))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/pass@1"] for r in records if "eval/pass@1" in r}
    trained = [r for r in records if r["step"] >= 1]
    timed = [r["timing/step_s"] for r in trained if r["step"] > 1 and "eval/pass@1" not in r]
    return {
        "step_s": median(timed) if timed else float("nan"), "before": evals.get(0), "after": evals.get(steps),
        "reward": sum(r["reward/mean"] for r in trained[-3:]) / len(trained[-3:]),
        "refills": sum(r.get("train/refills", 0.0) for r in trained),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--seed", type=int, default=0, help="the RL runs' seed (the SFT policy stays the same)")
    parser.add_argument("--work", type=Path, default=None, help="keeps the example and SFT policy (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-algorithms-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workload in {work}", flush=True)
    example, policy = prepare(work)
    rows = {}
    for name in args.algorithms.split(","):
        out = work / "runs" / f"{name}-seed{args.seed}-{int(time.time())}"
        rows[name] = run(name, args.steps, example, policy, out, args.seed)
        print(f"  {name}: {rows[name]}", flush=True)
    print(f"\n{args.steps} steps of 64 samples each (16 prompts x 4; reinforce_pp 64 x 1), seed {args.seed}, same lr; "
          f"pass@1: 48 held-out problems x 4 samples")
    print(f"{'algorithm':<24}{'median step s':>14}{'pass@1 before':>15}{'pass@1 after':>14}{'reward last 3':>15}"
          f"{'refills':>9}")
    for name, r in rows.items():
        print(f"{name:<24}{r['step_s']:>14.2f}{r['before']:>15.3f}{r['after']:>14.3f}{r['reward']:>15.3f}"
              f"{r['refills']:>9.0f}")


if __name__ == "__main__":
    main()
