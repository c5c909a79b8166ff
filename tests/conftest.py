"""Shared fixtures: run the `flywheel` CLI as users do, and one toy SFT model per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIST_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def run_flywheel(*args: str, timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``flywheel ARGS`` in a subprocess (importable from any cwd, even without the editable install)."""
    # in-process learner tests leave torch.distributed's rendezvous variables set (and its
    # port bound); a CLI run must pick its own
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )


def launch(command: list[str], log, env: dict) -> subprocess.Popen:
    """`flywheel train` in a process group of its own, with SIGINT as in a terminal's
    foreground job (the suite may run in a background job, which starts with it ignored)."""
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def sft_policy(out_dir: str | Path, given: str | None = None) -> str:
    """``given``, or a fresh `flywheel sft sft-toy` policy in ``out_dir`` (for benchmarks)."""
    if given is not None:
        return given
    proc = run_flywheel("sft", "sft-toy", "--out", str(out_dir))
    if proc.returncode != 0:
        raise RuntimeError(f"flywheel sft sft-toy failed:\n{proc.stderr[-3000:]}")
    return str(Path(out_dir) / "model")


@pytest.fixture(scope="session")
def toy_sft_run(tmp_path_factory) -> dict:
    """`flywheel sft sft-toy` exactly as the demo runs it; returns summary.json plus paths."""
    out = tmp_path_factory.mktemp("sft-toy")
    proc = run_flywheel("sft", "sft-toy", "--out", str(out), timeout=1800)  # ~1 min alone; far slower under load
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "out": out}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (actors ask for num_cpus=0 on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def save_tiny_llama(path: Path, texts: list[str], vocab_size: int, seed: int, chat_template: str | None = None,
                    **shape) -> Path:
    """A randomly initialised toy Llama (``shape``: ToyModelConfig fields) with a BPE
    tokenizer trained on ``texts``, saved as a HF directory at ``path``."""
    from services.core.config import ToyModelConfig
    from services.core.tiny_model import build_toy_llama, train_toy_tokenizer

    tokenizer = train_toy_tokenizer(texts, vocab_size=vocab_size)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model = build_toy_llama(ToyModelConfig(**shape), tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer toy Llama with the toy tokenizer, as a HF directory."""
    from services.core import toy_world

    rows = toy_world.sft_corpus(["preference", "arithmetic"], 500, seed=0)
    texts = [r["prompt"] + r["response"] for r in rows]
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-model"), texts, vocab_size=400, seed=0, num_layers=2)
