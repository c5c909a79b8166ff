"""The sync invariant on what `flywheel train` produced: the rollout engine's log-prob of every
sampled token (OUT/rollouts.pb) against a plain transformers forward pass (fp32) of the policy
of the version that sampled it, that is the export of OUT/checkpoints/step-<version> (or the
initial policy for version 0)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

TOLERANCE = 1e-4  # fp32 on CPU: measured gaps are about 3e-6


def make_untied_copy(policy: Path, target: Path, seed: int = 0) -> Path:
    """``policy`` (a tied-embedding HF directory) as an untied model: the output head is the
    embedding plus a little noise, its own tensor in the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    head = model.get_input_embeddings().weight.detach().clone()
    head += 0.01 * torch.randn(head.shape, generator=torch.Generator().manual_seed(seed))
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    untied.load_state_dict({**{k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
                            "lm_head.weight": head}, strict=True)
    untied.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy).save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    assert config["tie_word_embeddings"] is False, config
    return target


def sampler_gap_by_version(out: Path, initial_policy: Path, steps: set[int] | None = None) -> dict[int, dict]:
    """Per policy version of the dumped trajectories (of ``steps``, default all): the max and
    mean |sampler log-prob - transformers log-prob| over their response tokens (an episode's
    policy tokens), and the count."""
    from transformers import AutoModelForCausalLM

    from services.driver.checkpoint import read_state
    from services.learner.export import export_checkpoint
    from services.rpc.trajectory_io import read_trajectories

    by_version = defaultdict(list)
    for record in read_trajectories(out / "rollouts.pb"):
        if steps is None or record.step in steps:
            by_version[record.trajectory.policy_version].append(record.trajectory)
    checkpoints = {read_state(path)["policy_version"]: path for path in (out / "checkpoints").glob("step-*")}
    result = {}
    for version, trajectories in sorted(by_version.items()):
        if version == 0:
            policy = initial_policy
        else:
            assert version in checkpoints, f"no checkpoint of policy version {version} in {out / 'checkpoints'}"
            policy = export_checkpoint(checkpoints[version], out / f"export-v{version}")
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
        gaps = []
        with torch.no_grad():
            for t in trajectories:
                ids = torch.tensor([list(t.prompt_ids) + list(t.response_ids)])
                logp = model(ids).logits[0].log_softmax(-1)
                start = len(t.prompt_ids) - 1
                expected = logp[start : start + len(t.response_ids)].gather(1, ids[0, start + 1 :, None])[:, 0]
                if t.loss_mask is not None:  # an episode: the sampler's log-probs are of its policy tokens
                    expected = expected[torch.tensor(t.loss_mask, dtype=torch.bool)]
                gaps.append((torch.tensor(t.logprobs) - expected).abs())
        gap = torch.cat(gaps)
        result[version] = {"max": float(gap.max()), "mean": float(gap.mean()), "tokens": int(gap.numel()),
                           "trajectories": len(trajectories)}
    return result


def check_sync_invariant(out: Path, policy: Path, versions: list[int]) -> list[dict]:
    """Every dumped sampler log-prob of each of ``versions`` (exactly those were sampled) within
    TOLERANCE of a transformers forward pass of that version's policy, and the run's own gap
    monitor agreeing, without alarm; returns the metrics records that carry a gap measurement."""
    from services.core.metrics import read_metrics

    gaps = sampler_gap_by_version(out, policy)
    print(f"{out.name}: sampler vs transformers per version: {json.dumps(gaps)}")
    assert sorted(gaps) == versions
    for version, gap in gaps.items():
        assert gap["max"] <= TOLERANCE, (version, gap)
    measured = [r for r in read_metrics(out / "metrics.jsonl") if "rollout/logprob_gap_max" in r]
    assert measured, "the run logged no train-inference gap"
    for record in measured:
        assert record["rollout/logprob_gap_max"] < TOLERANCE, record
        assert record["rollout/logprob_gap_alarm"] == 0.0 and record["rollout/logprob_gap_ratio_outside"] == 0.0
    return measured
