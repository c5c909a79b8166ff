"""A real Ray head (`ray start --head --block`) with its dashboard, job and state APIs, for e2e
tests that need more than a plain local `ray.init()`.

The head gets its own --temp-dir, so it writes no /tmp/ray/ray_current_cluster and a plain
`ray.init()` elsewhere in this session (the ray_session fixture) still starts its own local
Ray. It runs as a child of this process and is stopped by SIGTERM to that child only:
`ray stop` would kill every Ray on the machine, other sessions' included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import DIST_ENV

HEAD_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str  # the dashboard's http address (job and state APIs)
    token: str
    temp_dir: str
    gcs_port: int

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def env(self) -> dict[str, str]:
        """What a process needs to talk to this head (token auth)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


def stop_head(head: subprocess.Popen, temp_dir: str, token: str | None = None) -> None:
    """SIGTERM the `ray start --block` child (it stops its own processes), then kill, by pid,
    whatever of this head is left (see `head_processes`)."""
    import psutil

    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(10)
    time.sleep(1)
    for _ in range(5):  # again: a raylet killed in this pass may have spawned a worker meanwhile
        leftovers = head_processes(temp_dir, token)
        if not leftovers:
            break
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(leftovers, timeout=5)
    shutil.rmtree(temp_dir, ignore_errors=True)


def head_processes(temp_dir: str, token: str | None = None) -> list:
    """The live processes (psutil) of the head with ``temp_dir``: those naming it on their command
    line and, as Ray retitles its workers and agents ("ray::IDLE", "ray::DashboardAgent"), those
    started with the head's ``token`` in their environment (RAY_AUTH_TOKEN) and the descendants of all."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(temp_dir in part for part in proc.info["cmdline"] or []) or (
                    token and proc.environ().get("RAY_AUTH_TOKEN") == token):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
    live = []
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
    return live


@contextlib.contextmanager
def ray_head(extra_env: dict[str, str] | None = None, *, num_cpus: int = 2, extra_args: list[str] = (),
             gcs_port: int | None = None):
    """A fresh head with the dashboard on loopback; ``extra_env`` reaches its raylet and workers,
    ``extra_args`` are added to its `ray start`, ``gcs_port`` is picked free unless given."""
    # short: Ray's unix socket paths under the temp dir must stay under 108 characters
    temp_dir = tempfile.mkdtemp(prefix="fwhead", dir="/tmp")
    token = secrets.token_hex(16)
    dashboard, gcs = free_port(), gcs_port or free_port()
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV | {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"}}
    # the job's entrypoint runs `python` from the head's PATH: make it this venv's
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # do not depend on ~/.ray/auth_token
    env.update(extra_env or {})
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--num-cpus={num_cpus}", "--include-dashboard=true", f"--temp-dir={temp_dir}", *extra_args,
    ]
    log = open(f"{temp_dir}.log", "w")
    started = time.monotonic()
    head_proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir)
    try:
        head = Head(f"http://127.0.0.1:{dashboard}", token, temp_dir, gcs)
        while True:
            try:
                head.client()
                break
            except Exception as exc:
                if head_proc.poll() is not None or time.monotonic() - started > HEAD_START_TIMEOUT_S:
                    raise RuntimeError(f"Ray head did not come up ({exc}):\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(1)
        print(f"Ray head with dashboard up in {time.monotonic() - started:.1f}s")
        yield head
    finally:
        stop_head(head_proc, temp_dir, token)
        log.close()
        os.unlink(log.name)


class StateApi:
    """Ray's state API on ``head``, with its token (Ray reads RAY_AUTH_MODE once per process)."""

    def __init__(self, head):
        from ray.util.state import StateApiClient

        self.client = StateApiClient(address=head.address, headers={"Authorization": f"Bearer {head.token}"})

    def _list(self, resource: str, filters: list) -> list:
        from ray.util.state.common import ListApiOptions, StateResource

        return self.client.list(StateResource(resource), options=ListApiOptions(filters=filters, limit=10_000),
                                raise_on_missing_output=False)

    def actors(self, *filters) -> list:
        return self._list("actors", list(filters))

    def tasks(self, *filters) -> list:
        return self._list("tasks", list(filters))

    def nodes(self, *filters) -> list:
        return self._list("nodes", list(filters))
