"""Shared by the hostile-input tests (tests/unit/test_hostile_*.py): run the real `flywheel`
command, check it failed as a user's mistake should (exit 2, ``error: ...``, no traceback), and
an OUT holding a finished run (``good_run``) or SFT (``good_sft``) whose bytes must not change."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from services.driver.checkpoint import CheckpointStore, model_fingerprint
from tests.conftest import run_flywheel

STALE_MODEL = "0123456789abcdef"


def flywheel(*args: str) -> subprocess.CompletedProcess:
    return run_flywheel(*args, timeout=300)


def load(preset: str, *overrides: str):
    from services.core.config_loading import load_config

    return load_config(preset, list(overrides))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: file bytes, None for a directory."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def assert_user_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stderr.startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr[-3000:]}"


def make_checkpoint(root: Path, step: int, fingerprint: str, algorithm: str = "grpo",
                    files: dict[str, bytes] | None = None) -> Path:
    """``files``: more files (path in the checkpoint -> bytes), recorded in its manifest."""
    store = CheckpointStore(root, keep_last=5)
    tmp = store.begin(step)
    (tmp / "learner" / "policy").mkdir(parents=True)
    for name, data in (files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    (tmp / "config.yaml").write_text("algorithm:\n  name: grpo\n")
    state = {"algorithm": algorithm, "model_fingerprint": fingerprint, "draws": step, "policy_version": step}
    return store.commit(tmp, step, state)


@pytest.fixture
def good_run(tmp_path, tiny_model_dir) -> Path:
    """An OUT holding a finished 2-step GRPO run of ``tiny_model_dir`` (what a user must not lose)."""
    out = tmp_path / "good-run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": 0.1 * s}) + "\n" for s in (1, 2)))
    (out / "config.yaml").write_text("algorithm:\n  name: grpo\n")
    (out / "policy").mkdir()
    (out / "policy" / "model.safetensors").write_bytes(b"\x00weights\x01")
    make_checkpoint(out / "checkpoints", 2, model_fingerprint(tiny_model_dir))
    return out


def train_fails(good_run: Path, *args: str, expected: list[str]) -> subprocess.CompletedProcess:
    """`flywheel train ARGS --out good_run` exits 2 with ``expected`` and leaves good_run as it was."""
    before = snapshot(good_run)
    proc = flywheel("train", *args, "--out", str(good_run))
    assert_user_error(proc, *expected)
    assert snapshot(good_run) == before, "the failed command changed the existing run"
    return proc


@pytest.fixture
def good_sft(tmp_path) -> Path:
    out = tmp_path / "good-sft"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_bytes(b"\x00weights")
    (out / "summary.json").write_text('{"rows": 2}')
    return out
