"""One writer per output directory.

Every `flywheel` command that writes an OUT (train, sft, train-rm, eval-rm, demo, study,
export) holds an exclusive advisory lock (``flock``) on ``OUT/.flywheel.lock`` for as long
as it runs. A second command into the same OUT exits 2 and names the first one's pid, host
and command. The kernel drops the lock when its process dies, even by SIGKILL, so a stale
lock file never blocks a later run; the file is removed when the command ends, and the
directories made only to hold it are removed too, so a command that fails leaves OUT as it
found it.

``flock`` locks are reliable on local file systems; on NFS they depend on the server.

``previous_outputs`` is the other half of "one writer": `flywheel sft`, `train-rm`,
`eval-rm` and `export` refuse an OUT that holds an earlier result unless ``--overwrite``
(`flywheel train` refuses one with checkpoints unless ``--resume``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from services.core.errors import UserError

LOCK_FILE = ".flywheel.lock"

# what each command writes into OUT: an OUT holding any of them holds an earlier result
OUTPUTS = {
    "sft": ("model", "metrics.jsonl", "summary.json"),
    "train-rm": ("members", "ensemble.yaml", "pairs", "metrics.jsonl", "summary.json"),
    "eval-rm": ("eval.json",),
}


def previous_outputs(out: Path, command: str) -> list[str]:
    """The names in ``out`` an earlier ``command`` left there (for `export`, whatever OUT
    holds: it is a model directory, and a stale weight shard would be loaded with the new)."""
    if not out.is_dir():
        return []
    if command == "export":
        return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    return [name for name in OUTPUTS.get(command, ()) if (out / name).exists()]


def check_no_previous_outputs(out: Path, command: str, overwrite: bool) -> None:
    found = previous_outputs(out, command)
    if found and not overwrite:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise UserError(
            f"--out: {out} already holds {'files' if command == 'export' else 'the output of a `flywheel ' + command + '`'}"
            f" ({shown}); pass --overwrite to write over it, or choose another --out"
        )


def _make_dirs(out: Path) -> list[Path]:
    """mkdir -p ``out``; the directories it made, deepest first."""
    made = []
    for path in (out, *out.absolute().parents):
        if path.exists():
            break
        made.append(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out: cannot create {out}: {exc.strerror or exc}; choose another --out") from None
    return made


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        return f"{info['command']}, pid {info['pid']} on host {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


@contextmanager
def out_lock(out: Path, command: str) -> Iterator[Path]:
    """Hold OUT's lock for the ``with`` body; UserError when another process holds it."""
    made = _make_dirs(out)
    path = out / LOCK_FILE
    try:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"--out: cannot write {path}: {exc.strerror or exc}; choose another --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise UserError(f"--out: cannot lock {path}: {exc.strerror or exc}") from None
                raise UserError(
                    f"--out: {out} is in use by another run ({holder}); two commands writing one OUT would mix "
                    "their metrics and checkpoints: wait for it to end, or choose another --out"
                ) from None
            try:  # the holder before us may have removed the file between our open and our lock
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "started": stamp}).encode())
        yield path
    finally:
        try:
            os.unlink(path)  # while still locked: a waiter that opened this inode sees it is gone
        except OSError:
            pass
        os.close(fd)
        _remove_empty(made)


def _remove_empty(made: list[Path]) -> None:
    for path in made:  # deepest first; stops at the first one the command wrote into
        try:
            path.rmdir()
        except OSError:
            break
