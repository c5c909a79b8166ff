"""`flywheel train` as a child process against a Ray head (tests/ray_head.py), for e2e tests
that kill things while it runs: start it, follow its metrics.jsonl, wait for it (bounded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import DIST_ENV, REPO

RUN_TIMEOUT_S = 1500


def start_train(head, config: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV | {"RAY_ADDRESS"}}
    env.update(head.env(), PYTHONPATH=str(REPO))
    log = open(out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "train", str(config), "--out", str(out), *extra],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen) -> str:
    """Wait for the run (bounded); its whole output."""
    try:
        proc.wait(RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.log.close()
    return Path(proc.log.name).read_text()


def steps_logged(out: Path) -> list[dict]:
    """metrics.jsonl so far (a line being written is skipped)."""
    path, records = out / "metrics.jsonl", []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(r.get("step") == step for r in steps_logged(out)):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"step {step} not logged within {timeout_s}s"
        time.sleep(0.2)
