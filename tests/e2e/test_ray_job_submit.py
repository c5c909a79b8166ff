"""`flywheel submit` against a real Ray head (`ray start --head`, see tests/ray_head.py) with
its job API: a short toy GRPO run as a Ray job, plus the two ways it must fail fast and locally.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time

import pytest

from services.core.metrics import read_metrics
from tests.conftest import DIST_ENV, REPO, run_flywheel
from tests.ray_head import StateApi, free_port
from tests.ray_head import ray_head as start_ray_head


@pytest.fixture(scope="module")
def ray_head():
    with start_ray_head() as head:
        yield head


def test_bad_config_fails_locally_before_contacting_ray():
    with socket.socket() as listener:  # a "dashboard" that records whether anyone connects
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        proc = run_flywheel("submit", "grpo-toy", "learner.lr=-1", "--address", address, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "learner.lr" in proc.stderr and "Traceback" not in proc.stderr
        with pytest.raises(socket.timeout):
            listener.accept()


def test_unreachable_address_is_a_clear_error():
    address = f"http://127.0.0.1:{free_port()}"
    proc = run_flywheel("submit", "grpo-toy", "--address", address, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot reach the Ray dashboard" in proc.stderr and address in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bad_token_is_a_clear_error(ray_head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    proc = run_flywheel("submit", "grpo-toy", "--address", ray_head.address, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "RAY_AUTH_TOKEN" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_plain_ray_init_does_not_join_the_head(ray_head):
    """What the ray_session fixture does while this head runs: it must get its own Ray."""
    code = "import ray; ctx = ray.init(include_dashboard=False); print('GCS', ctx.address_info['gcs_address'])"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV | {"RAY_ADDRESS"}}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gcs = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS "))
    assert not gcs.endswith(f":{ray_head.gcs_port}"), gcs


def wait_for(what: str, check, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.3)
    return value


@pytest.mark.slow
def test_submit_stop_and_resume_toy_grpo_as_ray_jobs(ray_head, toy_sft_run, tmp_path, monkeypatch):
    """A 30-step run as a Ray job, `ray job stop` (the job API's stop) after step 2: the job
    ends STOPPED with a checkpoint of its last logged step and no actor left; `flywheel submit
    ... --resume --follow` then finishes it with contiguous metrics."""
    from services.driver.checkpoint import CheckpointStore

    # the config file lies outside the uploaded working dir and overrides come on top: both
    # must reach the job (submit sends the resolved config inside the upload)
    config = tmp_path / "my-grpo.yaml"
    config.write_text((REPO / "services" / "presets" / "grpo-toy.yaml").read_text())
    work = tmp_path / "work"  # a copy, so the test never writes into the repository
    shutil.copytree(REPO / "services", work / "services", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    sid = f"flywheel-test-{secrets.token_hex(3)}"
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    run = [str(config), f"model.path={toy_sft_run['out'] / 'model'}", "algorithm.total_steps=30",
           "rollout.prompts_per_step=8", "--address", ray_head.address, "--out", str(out), "--working-dir", str(work)]
    proc = run_flywheel("submit", *run, "--submission-id", sid, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"submitted Ray job {sid} to {ray_head.address}" in proc.stdout
    for hint in (f"ray job logs --follow {sid} --address {ray_head.address}", f"ray job stop {sid}",
                 f"{ray_head.address}/#/jobs/{sid}"):
        assert hint in proc.stdout
    client = ray_head.client()
    wait_for("step 2 logged", lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out / "metrics.jsonl")) >= 2)
    client.stop_job(sid)
    status = wait_for("the stopped job's end", lambda: (s := client.get_job_status(sid)).is_terminal() and s, 300)
    logs = client.get_job_logs(sid)
    assert status == "STOPPED", logs[-3000:]
    assert "stopped by SIGTERM" in logs, logs[-3000:]
    stopped_at = len(read_metrics(out / "metrics.jsonl"))
    assert 2 <= stopped_at < 30
    assert CheckpointStore(out / "checkpoints").latest().name == f"step-{stopped_at:06d}"
    state = StateApi(ray_head)
    wait_for("no actor of the stopped job alive", lambda: not state.actors(("state", "=", "ALIVE")), 60)

    resumed_sid = f"{sid}-resumed"
    started = time.monotonic()
    proc = run_flywheel("submit", *run, "--resume", "--follow", "--submission-id", resumed_sid, timeout=900)
    print(f"flywheel submit --resume --follow: {time.monotonic() - started:.1f}s\n{proc.stdout[-600:]}")
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "Running entrypoint for job" in proc.stdout  # the job's log was streamed
    assert f"resumed from {out / 'checkpoints'}" in proc.stdout
    assert f"job {resumed_sid} SUCCEEDED" in proc.stdout
    assert client.get_job_status(resumed_sid) == "SUCCEEDED"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert [r["policy_version"] for r in records] == list(range(1, 31))
    assert not (work / f"flywheel-job-{sid}.yaml").exists()  # staged only for the upload

    # the same id again is refused by Ray, with exit 2 and no traceback
    again = run_flywheel("submit", str(config), "--address", ray_head.address, "--submission-id", sid,
                         "--working-dir", str(work), "--out", str(out), timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
