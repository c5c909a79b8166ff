"""Stops the local Ray processes of a driver that died without shutting Ray down (SIGKILL, the
OOM killer). Ray's raylet, GCS and workers follow their driver within seconds, but its
dashboard and runtime-env agents go on waiting for the dead GCS for minutes. ``init_ray``
starts a reaper, in a session of its own, when it starts local Ray:

    python -m services.core.orphan_reaper DRIVER_PID

While the driver lives, the reaper notes every process below it, once a second. When the
driver is gone, it waits ``GRACE_S`` (Ray's own processes stop first) and kills those still
running; psutil checks each one's start time, so a reused pid is never hit. After a normal
exit (``ray.shutdown``) there is nothing left to kill."""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 3.0


def alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(driver_pid: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> list[int]:
    """Blocks until ``driver_pid`` has exited; returns the pids it then killed."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    seen: dict[int, psutil.Process] = {}
    while alive(driver):
        try:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():
                    seen.setdefault(child.pid, child)
        except psutil.Error:
            pass
        time.sleep(poll_s)
    time.sleep(grace_s)
    killed = []
    for process in seen.values():
        if alive(process):
            try:
                process.kill()
                killed.append(process.pid)
            except psutil.Error:
                pass
    return killed


def stop_descendants(spare: int | None = None, wait_s: float = 3.0) -> list[int]:
    """SIGTERM every process below this one (but ``spare``), SIGKILL those still running after
    ``wait_s``: the local Ray that a start-up cut short by Ctrl-C leaves. Returns their pids."""
    import psutil

    found = [p for p in psutil.Process().children(recursive=True) if p.pid != spare and alive(p)]
    for process in found:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, running = psutil.wait_procs(found, timeout=wait_s)
    for process in running:
        try:
            process.kill()
        except psutil.Error:
            pass
    return [p.pid for p in found]


def start_reaper(driver_pid: int | None = None) -> subprocess.Popen:
    """The reaper of ``driver_pid`` (default: this process), detached from its session."""
    return subprocess.Popen(
        [sys.executable, "-m", "services.core.orphan_reaper", str(driver_pid or os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]))
