"""Hostile inputs about the output directory: a fresh run over a run with checkpoints, an
--out that is a file or cannot be made, two commands writing one OUT at once (issue #22: a lock
held for the whole command), an earlier result written over without ``--overwrite``. Each is
refused with exit 2 before anything is written (helpers: tests/hostile.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.errors import UserError
from services.core.out_lock import LOCK_FILE
from services.driver import preflight
from tests.hostile import (  # noqa: F401 (good_run, good_sft: fixtures)
    STALE_MODEL, assert_user_error, flywheel, good_run, good_sft, make_checkpoint, snapshot, train_fails,
)


# --- 12. a fresh run into an OUT that holds a run -----------------------------------------------


def test_fresh_train_into_a_run_with_checkpoints_is_refused(good_run):
    train_fails(good_run, "grpo-toy", expected=[
        f"--out: {good_run} already holds a run with checkpoints (latest: {good_run / 'checkpoints' / 'step-000002'})",
        "Pass --resume to continue it, or choose another --out",
    ])


def test_check_fresh_out(tmp_path):
    out = tmp_path / "run"
    preflight.check_fresh_out(out, None)  # nothing there yet
    (out / "checkpoints" / "step-000004").mkdir(parents=True)  # died before driver_state.json: not a checkpoint
    (out / "checkpoints" / ".tmp-step-000005-123").mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    preflight.check_fresh_out(out, None)
    done = make_checkpoint(out / "checkpoints", 6, STALE_MODEL)
    with pytest.raises(UserError, match="already holds a run with checkpoints"):
        preflight.check_fresh_out(out, None)
    preflight.check_fresh_out(out, done)  # --resume or checkpoint.resume_from: not a fresh run


# --- 13. an --out that cannot be a directory ------------------------------------------------------


@pytest.mark.parametrize("command", [["train", "grpo-toy"], ["sft", "sft-toy"], ["demo"]])
def test_out_that_is_a_file_or_under_one_is_refused(tmp_path, command):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    assert_user_error(flywheel(*command, "--out", str(a_file)), f"--out: {a_file} is a file, not a directory")
    assert_user_error(flywheel(*command, "--out", str(a_file / "run")),
                      f"--out: {a_file} is a file, not a directory, so --out {a_file / 'run'} cannot be made")
    assert a_file.read_text() == "mine\n" and sorted(tmp_path.iterdir()) == [a_file]


def test_check_out_dir(tmp_path):
    preflight.check_out_dir(tmp_path)  # an existing directory
    preflight.check_out_dir(tmp_path / "new" / "run")  # to be made
    preflight.check_out_dir(Path("relative-run"))  # under the working directory
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file, not a directory"):
        preflight.check_out_dir(tmp_path / "f" / "deeper" / "run")


# --- 14. an --out that cannot be made; one writer per OUT; --overwrite ----------------------------


@pytest.mark.parametrize("command", [["train", "grpo-toy"], ["sft", "sft-toy"]])
def test_out_that_cannot_be_created_is_named(command):
    """Issue #22: a FileNotFoundError traceback (/proc takes no new directories, even from root)."""
    assert_user_error(flywheel(*command, "--out", "/proc/flywheel-run/out"),
                      "--out: cannot create /proc/flywheel-run/out: No such file or directory; choose another --out")


def wait_for_lock(out: Path, proc, timeout_s: float = 120) -> dict:
    """The lock file's record once ``proc`` has written it."""
    import json
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            return json.loads((out / LOCK_FILE).read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"no lock in {out} after {timeout_s} s")


def test_a_second_command_into_an_out_in_use_is_refused_naming_the_first(tmp_path, tiny_model_dir):
    """Issue #22: two `flywheel train` into one OUT both ran, mixing metrics.jsonl and checkpoints.
    The first here is a real `flywheel sft` (it holds OUT while it trains); each later command
    into that OUT exits 2 naming its pid and host and writes nothing. Once it is SIGKILLed, its
    lock file is left behind but holds nothing: the next command runs on (and fails later, on
    the port it is given, which is held)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from tests.conftest import DIST_ENV, REPO

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    first = subprocess.Popen([sys.executable, "-m", "services.cli", "sft", "sft-toy", "--out", str(out),
                              f"model.path={tiny_model_dir}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for_lock(out, first)
        assert holder["pid"] == first.pid and holder["command"] == "flywheel sft"
        in_use = (f"--out: {out} is in use by another run (flywheel sft, pid {first.pid} on host "
                  f"{socket.gethostname()}, since {holder['started']})")
        before = snapshot(out)
        assert_user_error(flywheel("train", "grpo-toy", "--out", str(out)), in_use, "choose another --out")
        assert_user_error(flywheel("export", str(tmp_path / "no-checkpoint"), str(out), "--overwrite"), in_use)
        after = snapshot(out)
        assert {k: v for k, v in after.items() if k in before} == before  # the SFT may have written more
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / LOCK_FILE).is_file()  # SIGKILL: no clean-up, but the kernel dropped the lock
    with socket.socket() as holder_socket:
        holder_socket.bind(("127.0.0.1", 0))
        holder_socket.listen()
        port = holder_socket.getsockname()[1]
        assert_user_error(flywheel("train", "grpo-toy", "--out", str(out), f"metrics.prometheus_port={port}"),
                          f"metrics.prometheus_port: cannot serve on 127.0.0.1:{port}")
    assert not (out / LOCK_FILE).exists()  # removed by the command that held it last


def test_out_lock_leaves_nothing_behind(tmp_path):
    """The directories made to hold the lock go when the command fails; a directory the command
    wrote into stays."""
    from services.core.out_lock import out_lock

    with pytest.raises(UserError, match="bad input"):
        with out_lock(tmp_path / "a" / "b" / "run", "flywheel sft"):
            raise UserError("bad input")
    assert list(tmp_path.iterdir()) == []
    with out_lock(tmp_path / "a" / "run", "flywheel sft") as lock:
        assert lock.parent.is_dir()
        (lock.parent / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in (tmp_path / "a" / "run").iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("command, preset, earlier", [
    ("sft", "sft-toy", ["model", "summary.json"]),
    ("train-rm", "rm-toy", ["members", "ensemble.yaml"]),
    ("eval-rm", "rm-toy", ["eval.json"]),
])
def test_an_earlier_result_is_not_written_over_without_overwrite(tmp_path, command, preset, earlier):
    """Issue #22: `flywheel sft` (and train-rm, eval-rm) wrote over an earlier result silently,
    while `flywheel train` refused; now each refuses unless --overwrite."""
    out = tmp_path / "out"
    for name in earlier:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        if "." in name:
            (out / name).write_text("{}")
        else:
            (out / name).mkdir()
    before = snapshot(out)
    assert_user_error(flywheel(command, preset, "--out", str(out)),
                      f"--out: {out} already holds the output of a `flywheel {command}` ({', '.join(earlier)}); "
                      "pass --overwrite to write over it, or choose another --out")
    assert snapshot(out) == before


def test_export_into_a_directory_that_holds_files_needs_overwrite(good_run, tmp_path):
    target = tmp_path / "exported"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    checkpoint = good_run / "checkpoints"
    assert_user_error(flywheel("export", str(checkpoint), str(target)),
                      f"--out: {target} already holds files (notes.txt); pass --overwrite")
    proc = flywheel("export", str(checkpoint), str(target), "--overwrite")  # on to the checkpoint's own check
    assert_user_error(proc, "holds no DeepSpeed policy checkpoint")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_train_overwrite(good_run, tiny_model_dir):
    """`flywheel train --overwrite` starts afresh over a run: refused with --resume, and the old
    checkpoints go only once every check has passed (here the prompts file is missing)."""
    train_fails(good_run, "grpo-toy", "--overwrite", "--resume",
                expected=["--resume continues the run in OUT and --overwrite replaces it: pass one of them"])
    train_fails(good_run, "grpo-math", "--overwrite", f"model.path={tiny_model_dir}", "data.source=no-such.jsonl",
                expected=["data.source"])
