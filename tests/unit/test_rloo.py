"""RLOO, the algorithm added as one file (services/algorithms/rloo.py): its leave-one-out
advantages worked out by hand, its batch through the same StepInputs the driver builds, and
its registration (config, preflight) without any other file naming it."""

from __future__ import annotations

import pytest
import torch

from services.algorithms import batches
from services.algorithms.base import StepInputs, get_algorithm
from services.core.batch_types import Trajectory
from services.core.config_loading import load_config
from services.core.errors import UserError
from services.core.estimators import ADVANTAGE_ESTIMATORS, AdvantageInputs
from services.core.registry import ALGORITHMS
from services.driver.preflight import check_rl_settings


def traj(prompt_id, index, response_ids):
    return Trajectory(prompt_id=prompt_id, prompt="p", prompt_ids=[5, 6], response="r", response_ids=response_ids,
                      logprobs=[-0.5] * len(response_ids), finish_reason="stop", policy_version=0, sample_index=index)


def test_leave_one_out_advantages_by_hand():
    # group of 4: rewards 1, 2, 3, 6; the others' means are 11/3, 10/3, 3, 2
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5])
    mask = torch.tensor([[1, 1, 0]] * 4 + [[1, 0, 0], [0, 0, 0]])
    adv, returns = ADVANTAGE_ESTIMATORS.get("rloo")(
        AdvantageInputs(sequence_rewards=rewards[:4], token_rewards=torch.zeros(4, 3), mask=mask[:4], group_size=4)
    )
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])
    torch.testing.assert_close(adv, expected[:, None] * mask[:4], rtol=0, atol=1e-6)
    torch.testing.assert_close(returns, adv)
    pair, _ = ADVANTAGE_ESTIMATORS.get("rloo")(
        AdvantageInputs(sequence_rewards=rewards[4:], token_rewards=torch.zeros(2, 3), mask=mask[4:], group_size=2)
    )
    assert pair.abs().sum() == 0  # tied rewards: no signal (and nothing on the empty response)


def test_rloo_batch_from_step_inputs():
    trajectories = [traj("a", 0, [7, 8]), traj("a", 1, [9]), traj("b", 0, [7]), traj("b", 1, [8, 9, 10])]
    cfg = load_config("grpo-toy", ["algorithm.name=rloo", "rollout.n_samples=2"])
    tokens = batches.build_tokens(trajectories, 0)
    sampler = batches.sampler_logprobs(trajectories, tokens)
    algorithm = get_algorithm("rloo")
    assert (algorithm.loss_kind, algorithm.needs_critic, algorithm.group_relative) == ("ppo", False, True)
    batch, stats = algorithm.make_batch(StepInputs(
        trajectories, [1.0, 0.0, 0.25, 0.75], tokens, ref=sampler - 0.1, old=sampler, sampler=sampler, values=None,
        pad_id=0, cfg=cfg,
    ))
    # leave-one-out with 2 samples: A = r_i - r_other
    per_row = torch.tensor([1.0, -1.0, -0.5, 0.5])
    mask = batch.tokens.response_mask.bool()
    torch.testing.assert_close(batch.advantages, per_row[:, None] * mask, rtol=0, atol=0)
    torch.testing.assert_close(batch.old_logprobs, sampler)
    torch.testing.assert_close(batch.ref_logprobs, sampler - 0.1)
    assert batch.sampler_logprobs is None and stats["train/groups_kept"] == 2


def test_rloo_is_registered_everywhere_a_name_is_checked():
    assert "rloo" in ALGORITHMS.names()
    cfg = load_config("grpo-toy", ["algorithm.name=rloo", "algorithm.ppo_epochs=2", "algorithm.tis_cap=2"])
    assert cfg.algorithm.policy_gradient()
    check_rl_settings(cfg)
    with pytest.raises(UserError, match="rollout.n_samples: rloo needs at least 2 samples per prompt.*leave-one-out"):
        check_rl_settings(load_config("grpo-toy", ["algorithm.name=rloo", "rollout.n_samples=1"]))
    with pytest.raises(UserError, match="algorithm.name: unknown RL algorithm 'reinforce'; registered: dapo, dr_grpo, grpo, gspo, nash_md, online_dpo"):
        ALGORITHMS.get("reinforce")
