"""Shared fixtures: run the `flywheel` CLI as users do, and one toy SFT model per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_flywheel(*args: str, timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``flywheel ARGS`` in a subprocess (importable from any cwd, even without the editable install)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )


@pytest.fixture(scope="session")
def toy_sft_run(tmp_path_factory) -> dict:
    """`flywheel sft sft-toy` exactly as the demo runs it; returns summary.json plus paths."""
    out = tmp_path_factory.mktemp("sft-toy")
    proc = run_flywheel("sft", "sft-toy", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "out": out}
