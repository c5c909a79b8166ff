"""The Python tool's sandbox: run untrusted code from a policy's tool call in a child process
that cannot stall or crash the run.

Limits (``SandboxLimits``), set by `prlimit` (util-linux) in front of the command: CPU seconds
(``RLIMIT_CPU``: SIGXCPU, then SIGKILL) and address space (``RLIMIT_AS``: a MemoryError
inside) and file size (its output goes to files: a write beyond fails, EFBIG). Also a
wall-clock timeout (the whole process group is killed), a cap on the characters of output the
policy reads back (the rest is cut, and the cut is said), no network (a new network namespace, `unshare --net
--map-root-user`: only a downed loopback inside), a scratch directory as the working
directory, deleted afterwards, an empty environment and Python in isolated mode (``-I``).

Not isolated: the file system. The code runs as the run's user and can read and write what
the run can (running it as ``nobody`` needs a Python that ``nobody`` may execute; the venv's
here is under /root). No process-count limit either: a fork bomb lasts until the wall clock.

Where the network cannot be isolated (no `unshare`, user namespaces disabled) the tool
refuses to run and says why; it never runs code with the network open. Every outcome is a
``SandboxResult``: the tool turns it into the policy's observation, never an exception that
stops the run.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 512
    output_chars: int = 2000


@dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None when the code never ran
    stopped_by: str | None  # "cpu", "wall", "memory", "output" (it flooded its output file) or "unavailable"
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.stopped_by is None


@functools.cache
def network_isolation() -> tuple[list[str], str | None]:
    """The command prefix that runs a program without network, and None; or [] and why not."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return [], "the `unshare` program (util-linux) is not installed"
    prefix = [unshare, "--net", "--map-root-user", "--"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"`unshare --net` failed: {exc}"
    if probe.returncode != 0:
        return [], f"`unshare --net` failed: {probe.stderr.strip() or probe.returncode} (user namespaces disabled?)"
    return prefix, None


def limit_prefix(limits: SandboxLimits) -> list[str]:
    """`prlimit` in front of the command: the child's CPU seconds, address space, no core file
    (a prefix, not a ``preexec_fn``, which is unsafe in a process with threads, as actors are)."""
    memory = limits.memory_mb * 1024 * 1024
    written = output_file_bytes(limits)
    return [shutil.which("prlimit") or "prlimit", f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
            f"--as={memory}:{memory}", f"--fsize={written}:{written}", "--core=0", "--"]


def output_file_bytes(limits: SandboxLimits) -> int:
    """The most a file the code writes may hold (its output goes to files: SIGXFSZ beyond)."""
    return max(65536, 8 * limits.output_chars)


def _read(path: str, limits: SandboxLimits) -> str:
    with open(path, errors="replace") as f:
        return f.read(output_file_bytes(limits))


def _cut(text: str, limit: int, keep_end: bool = False) -> str:
    """At most ``limit`` characters of ``text``, saying how many were cut (an error's end matters most)."""
    if len(text) <= limit:
        return text
    note = f"[... {len(text) - limit} more characters cut]"
    return f"{note}\n{text[-limit:]}" if keep_end else f"{text[:limit]}\n{note}"


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code`` with ``limits`` (see the module); never raises for what the code does."""
    prefix, unavailable = network_isolation()
    if unavailable:
        return SandboxResult("", f"the python tool is unavailable: {unavailable}", None, "unavailable", 0.0)
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="flywheel-sandbox-")
    try:
        script = os.path.join(scratch, "main.py")
        with open(script, "w") as f:
            f.write(code)
        out_path, err_path = os.path.join(scratch, ".stdout"), os.path.join(scratch, ".stderr")
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(
                [*limit_prefix(limits), *prefix, sys.executable, "-I", "-B", script], cwd=scratch,
                env={"PATH": "/usr/bin:/bin", "HOME": scratch}, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,
            )
            stopped_by = None
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                stopped_by = "wall"
        stdout, stderr = _read(out_path, limits), _read(err_path, limits)
        if stopped_by is None and proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            stopped_by = "cpu"  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one
        elif stopped_by is None and (proc.returncode == -signal.SIGXFSZ or "File too large" in stderr):
            stopped_by = "output"  # Python ignores SIGXFSZ: its write fails with EFBIG instead
        elif stopped_by is None and "MemoryError" in stderr:
            stopped_by = "memory"
        stdout, stderr = _cut(stdout, limits.output_chars), _cut(stderr, limits.output_chars, keep_end=True)
        return SandboxResult(stdout, stderr, proc.returncode, stopped_by, time.monotonic() - started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def describe(result: SandboxResult, limits: SandboxLimits) -> str:
    """What the policy reads back: the output, or what stopped the code."""
    reasons = {
        "cpu": f"stopped: CPU time limit ({limits.cpu_s}s)",
        "wall": f"stopped: wall-clock timeout ({limits.wall_s:g}s)",
        "memory": f"stopped: memory limit ({limits.memory_mb} MB)",
        "output": f"stopped: output limit\n{result.stdout}",
        "unavailable": result.stderr,
    }
    if result.stopped_by in reasons:
        return reasons[result.stopped_by]
    text = result.stdout
    if result.exit_code != 0:
        text += ("\n" if text else "") + (result.stderr.strip().splitlines() or [f"exit status {result.exit_code}"])[-1]
    return text.strip()
