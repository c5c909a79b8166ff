"""Bad input, tried on purpose (issue #8), where it needs the running system: a user's reward
function that raises, returns NaN or returns the wrong number of scores inside the Ray reward
actors, and one `flywheel train` whose reward function raises in the middle of the run.

A user's reward function failing is a user error: `flywheel train` exits 2 with the scorer's
name, its config field and the line of the user's file, without a Python traceback, and the
step fails before the learner uses any score (never a silent 0 or None). The cases that fail
before Ray starts are in tests/unit/test_hostile_inputs.py.
"""

from __future__ import annotations

import json

import pytest

from services.core.config import RewardConfig, ScorerConfig
from services.driver.preflight import actor_user_error
from tests.conftest import run_flywheel

pytestmark = pytest.mark.slow

REWARDS = '''
import math

CALLS = [0]


def flaky(prompts, completions, **columns):  # fine at step 1, raises at step 2
    CALLS[0] += 1
    if CALLS[0] >= 2:
        raise ValueError(f"cannot parse {completions[0]!r}")
    return [float(len(c)) for c in completions]


def nan_at_1(prompts, completions, **columns):
    return [0.0, math.nan] + [0.0] * (len(prompts) - 2)


def one_short(prompts, completions, **columns):
    return [0.0] * (len(prompts) - 1)
'''


def assert_user_error(proc, *expected: str) -> None:
    """As in tests/unit/test_hostile_inputs.py, except that Ray's and vLLM's start-up logs come
    first on stderr: the error is the last thing printed."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    error = proc.stderr[proc.stderr.rindex("\nerror: ") + 1:]
    for text in expected:
        assert text in error, f"{text!r} not in:\n{error}"


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return path


def wait_until_gone(started: float, timeout_s: float = 60) -> None:
    """Every Ray process started since ``started`` ends within ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while (left := ray_processes(started)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left running after the run: {[(p.pid, p.name()) for p in left]}"


def test_train_stops_with_exit_2_when_the_reward_function_raises(tmp_path, tiny_model_dir, rewards_file):
    import time

    out, started = tmp_path / "run", time.time()
    scorers = json.dumps([{"kind": "python", "path": f"{rewards_file}:flaky", "name": "flaky"}])
    proc = run_flywheel(
        "train", "grpo-toy", "--out", str(out), f"model.path={tiny_model_dir}", "algorithm.total_steps=3",
        "rollout.prompts_per_step=4", f"reward.scorers={scorers}", timeout=900,
    )
    assert_user_error(
        proc,
        f"error: step 2: reward scorer 'flaky' (reward.scorers.0, python {rewards_file}:flaky) raised ValueError: "
        f"cannot parse ",
        f"(at {rewards_file}:10 in flaky)",
        "the run stopped before the learner used these scores",
    )
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # step 1 was trained and logged; step 2 was not
    assert not (out / "policy").exists()
    # a quiet terminal (metrics.service_logs: file, the default): the error above reached it with
    # the scorer's name, while the actors' own output went to OUT/logs/<actor>.log
    terminal = proc.stdout + proc.stderr
    assert f"service logs: {out / 'logs'}/" in terminal
    for noise in ("RolloutWorkerActor pid=", "LearnerRank", "Loading safetensors", "Triton", "NUMA"):
        assert noise not in terminal, (noise, terminal[-3000:])
    logs = {path.name: path.read_text() for path in (out / "logs").iterdir()}
    assert set(logs) == {"rollout-0.log", "learner-rank-0.log", "reference-0.log", "reward-0-flaky.log"}
    assert "Loading safetensors checkpoint shards" in logs["rollout-0.log"]
    wait_until_gone(started)  # no process of the run survives it


@pytest.mark.parametrize("fn, expected", [
    ("flaky", "reward scorer 'flaky' (reward.scorers.1, python {file}:flaky) raised ValueError: cannot parse "),
    ("nan_at_1", "reward scorer 'flaky': score at index 1 is not finite: nan"),
    ("one_short", "reward scorer 'flaky': wrong number of scores: expected 3, got 2"),
])
def test_reward_service_failures_name_the_member(ray_session, tmp_path, rewards_file, fn, expected):
    """Through the Ray reward service, as the driver calls it, and turned into the message
    `flywheel train` prints."""
    from services.reward.ensemble import RewardService

    cfg = RewardConfig(scorers=[ScorerConfig(kind="toy_gold"),
                                ScorerConfig(kind="python", path=f"{rewards_file}:{fn}", name="flaky")])
    service = RewardService(cfg)
    try:
        prompts, completions = ["12+7=", "3-1=", "list 2 colors:"], ["19", "2", " red blue"]
        if fn == "flaky":
            assert service.score(prompts, completions).member_scores[1] == [2.0, 1.0, 9.0]  # its first call is fine
        with pytest.raises(ray_session.exceptions.RayTaskError) as info:
            service.score(prompts, completions)
    finally:
        service.shutdown()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    message = str(actor_user_error(info.value, metrics))
    assert message.startswith("step 2: " + expected.format(file=rewards_file)), message
    assert "Traceback" not in message


def ray_processes(since: float) -> list:
    """Ray's processes (raylet, GCS, agents, workers) started after ``since`` (time.time()),
    but the test session's own Ray (``ray_session``, below this process)."""
    import psutil

    found, ours = [], {p.pid for p in psutil.Process().children(recursive=True)}
    for process in psutil.process_iter(["name", "cmdline", "create_time"]):
        if process.pid in ours:
            continue
        cmdline = " ".join(process.info["cmdline"] or [])
        ray_like = process.info["name"] in ("raylet", "gcs_server") or (process.info["name"] or "").startswith("ray::")
        if process.info["create_time"] >= since and (ray_like or "/ray/" in cmdline):
            found.append(process)
    return found


@pytest.mark.parametrize("presses", [1, 2], ids=["ctrl-c", "ctrl-c-twice"])
def test_ctrl_c_while_ray_starts_leaves_no_process_and_no_traceback(tmp_path, tiny_model_dir, presses):
    """Issue #22: Ctrl-C during start-up left `ray::DashboardAgent` and `ray::RuntimeEnvAgent`
    running as orphans (over 40 s), and could print a KeyboardInterrupt traceback from Ray's exit
    hook. Ctrl-C (SIGINT to the process group, once or twice) lands as soon as Ray's raylet
    exists, inside ``ray.init``: exit 130, "interrupted", no traceback, every Ray process the
    run started gone, OUT's lock released."""
    import os
    import signal
    import sys
    import time

    import psutil

    from tests.conftest import DIST_ENV, launch

    out = tmp_path / "run"
    command = [sys.executable, "-m", "services.cli", "train", "grpo-toy", "--out", str(out),
               f"model.path={tiny_model_dir}", "algorithm.total_steps=2"]
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    log = tmp_path / "stderr.txt"
    started = time.time()
    with log.open("w") as stderr_file:
        proc = launch(command, stderr_file, env)
        try:
            deadline = time.monotonic() + 300
            while not any(p.name() == "raylet" for p in psutil.Process(proc.pid).children(recursive=True)):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "Ray did not start within 5 minutes"
                time.sleep(0.05)
            for press in range(presses):
                os.killpg(proc.pid, signal.SIGINT)
                time.sleep(0.3)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.rstrip().endswith("interrupted") and "Traceback" not in stderr, stderr[-3000:]
    wait_until_gone(started)  # the reaper's grace is 3 s; Ray's own processes stop sooner
    assert not (out / ".flywheel.lock").exists()
