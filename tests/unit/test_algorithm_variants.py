"""GSPO, DAPO, Dr. GRPO and REINFORCE++: their formulas against numbers worked out by hand
(in the comments) or by a slow loop over floats, their published defaults through the
config, and DAPO's dynamic sampling in the driver's loop on fakes (tests/fakes.py)."""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from services.algorithms import batches
from services.algorithms.base import StepInputs, get_algorithm
from services.core.batch_types import Trajectory
from services.core.config import AlgorithmConfig
from services.core.config_loading import load_config
from services.core.errors import UserError
from services.core.rl_variants import gspo_policy_loss, refill_prompts, reinforce_pp_advantages, returns_to_go
from services.driver.dynamic_sampling import ScoredGroup, fill_groups, join_groups, split_groups
from services.reward.aggregate import EnsembleScores, aggregate_scores
from tests.fakes import FakePending, FakeReward, fake_services
from tests.unit.test_driver_loop import run


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------------------- GSPO

def test_gspo_sequence_ratio_and_clipping_by_hand():
    # row 0: log ratios 0.1, 0.1 -> s = e^0.1 = 1.10517, A = +1: above 1 + 4e-4, so the clipped
    #        branch -A * 1.0004 = -1.0004 is the larger one (no gradient)
    # row 1: log ratios -0.3, 0, 0.3 -> mean 0, s = 1, A = -2: loss 2, unclipped
    # row 2: no response token: left out of the mean
    logprobs = t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5], [0.0, 0.0, 0.0]]).requires_grad_()
    old = t([[-1.1, -2.1, 0.0], [-0.2, -0.5, -0.8], [0.0, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    loss, stats = gspo_policy_loss(logprobs, old, t([1.0, -2.0, 5.0]), mask, 3e-4, 4e-4)
    assert loss.item() == pytest.approx((-1.0004 + 2.0) / 2)
    assert float(stats["clip_frac"]) == 0.5 and float(stats["ratio_mean"]) == pytest.approx((math.exp(0.1) + 1) / 2)
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * 0.1 ** 2 / 2)
    loss.backward()
    # d loss / d logprob of row 1's tokens: (1/2 sequences) * -A * s * (1/3 tokens) = 1/3
    torch.testing.assert_close(logprobs.grad, t([[0, 0, 0], [1 / 3] * 3, [0, 0, 0]]))
    # the same advantage given on every token ([B, T]) is the same loss; seq-mean-token-mean is the
    # default, token-mean weighs row 1 by its 3 tokens against row 0's 2: (2 * -1.0004 + 3 * 2) / 5
    per_token = t([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0], [0.0, 0.0, 0.0]])
    assert gspo_policy_loss(logprobs, old, per_token, mask)[0].item() == pytest.approx(loss.item())
    token_mean, _ = gspo_policy_loss(logprobs, old, per_token, mask, 3e-4, 4e-4, agg_mode="token-mean")
    assert token_mean.item() == pytest.approx((2 * -1.0004 + 3 * 2.0) / 5)


def test_gspo_loss_equals_a_slow_loop_on_random_batches():
    rng = random.Random(0)
    for _ in range(20):
        B, T = 4, 6
        mask = [[1 if rng.random() < 0.7 else 0 for _ in range(T)] for _ in range(B)]
        lp = [[rng.uniform(-3, 0) for _ in range(T)] for _ in range(B)]
        old = [[x + rng.uniform(-0.3, 0.3) for x in row] for row in lp]
        adv = [rng.uniform(-2, 2) for _ in range(B)]
        low, high = 0.05, 0.1
        per_seq = []
        for i in range(B):
            n = sum(mask[i])
            if not n:
                continue
            s = math.exp(sum((lp[i][j] - old[i][j]) for j in range(T) if mask[i][j]) / n)
            per_seq.append(max(-adv[i] * s, -adv[i] * min(max(s, 1 - low), 1 + high)))
        expected = sum(per_seq) / len(per_seq) if per_seq else 0.0
        loss, _ = gspo_policy_loss(t(lp), t(old), t(adv), t(mask), low, high)
        assert float(loss) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------- REINFORCE++

def test_reinforce_pp_returns_and_batch_normalisation_by_hand():
    # row 0: rewards -0.1, -0.1, 0.9 (KL penalties, then the outcome 1 - 0.1); row 1: padding, -0.2, 0.3
    rewards = t([[-0.1, -0.1, 0.9], [0.0, -0.2, 0.3]])
    mask = t([[1, 1, 1], [0, 1, 1]])
    # gamma 1: returns-to-go 0.7, 0.8, 0.9 and 0.1, 0.3
    torch.testing.assert_close(returns_to_go(rewards, mask), t([[0.7, 0.8, 0.9], [0.0, 0.1, 0.3]]))
    # gamma 0.5: 0.9; -0.1 + 0.45 = 0.35; -0.1 + 0.175 = 0.075
    torch.testing.assert_close(returns_to_go(rewards, mask, 0.5)[0], t([0.075, 0.35, 0.9]))
    # whitened over the 5 tokens: mean 0.56, deviations 0.14 0.24 0.34 -0.46 -0.26,
    # squares sum 0.472, unbiased variance 0.118
    adv, returns = reinforce_pp_advantages(rewards, mask)
    std = math.sqrt(0.118)
    torch.testing.assert_close(adv, t([[0.14, 0.24, 0.34], [0.0, -0.46, -0.26]]) / std, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(returns, t([[0.7, 0.8, 0.9], [0.0, 0.1, 0.3]]))
    # REINFORCE++-baseline, one group of 2 with outcomes 1 and 0: the mean 0.5 comes off the last token:
    # row 0 -> -0.1, -0.1, 0.4: returns 0.2, 0.3, 0.4; row 1 -> -0.2, -0.2: returns -0.4, -0.2
    _, returns = reinforce_pp_advantages(rewards, mask, group_size=2, sequence_rewards=t([1.0, 0.0]))
    torch.testing.assert_close(returns, t([[0.2, 0.3, 0.4], [0.0, -0.4, -0.2]]))


def traj(prompt_id, index, response_ids, logprob=-0.5):
    return Trajectory(prompt_id=prompt_id, prompt="p", prompt_ids=[5, 6], response="r", response_ids=response_ids,
                      logprobs=[logprob] * len(response_ids), finish_reason="stop", policy_version=0,
                      sample_index=index)


def test_reinforce_pp_batch_puts_the_kl_in_the_reward():
    trajectories = [traj("a", 0, [7, 8]), traj("b", 0, [9])]
    a = AlgorithmConfig(name="reinforce_pp")
    assert (a.kl_in_reward, a.kl_coef, a.kl_estimator, a.gamma) == (True, 0.01, "k1", 1.0)  # the defaults
    cfg = load_config("grpo-toy", ["algorithm.name=reinforce_pp", "rollout.n_samples=1", "algorithm.kl_coef=0.01",
                                   "algorithm.kl_estimator=k1"])
    tokens = batches.build_tokens(trajectories, 0)
    sampler = batches.sampler_logprobs(trajectories, tokens)
    algorithm = get_algorithm("reinforce_pp")
    assert not algorithm.group_relative and not algorithm.needs_critic
    batch, stats = algorithm.make_batch(StepInputs(
        trajectories, [1.0, 0.0], tokens, ref=sampler - 0.5, old=sampler, sampler=sampler, values=None, pad_id=0,
        cfg=cfg))
    # k1 = 0.5 per token, times 0.01: row a -0.005, 0.995 -> returns 0.99, 0.995; row b -0.005
    returns = torch.tensor([0.99, 0.995, -0.005], dtype=torch.float64)
    expected = (returns - returns.mean()) / returns.std()
    mask = batch.tokens.response_mask.bool()
    torch.testing.assert_close(batch.advantages[mask].double(), expected, rtol=1e-5, atol=1e-6)
    assert batch.ref_logprobs is None  # the KL is in the reward, not a loss term
    assert stats["reward/kl_penalty_mean"] == pytest.approx((0.01 + 0.005) / 2)


# ---------------------------------------------------------------------------- DAPO, Dr. GRPO, defaults

def test_published_defaults_fill_what_the_config_leaves_out():
    def algorithm(*overrides):
        return load_config("grpo-toy", list(overrides)).algorithm

    gspo = AlgorithmConfig(name="gspo")
    assert (gspo.clip_range, gspo.clip_range_high, gspo.loss_agg_mode, gspo.kl_coef) == (
        3e-4, 4e-4, "seq-mean-token-mean", 0.0)
    # a value the config sets wins (grpo-toy sets kl_coef 0.01)
    assert (algorithm("algorithm.name=gspo", "algorithm.clip_range=0.01").clip_range,
            algorithm("algorithm.name=gspo").kl_coef) == (0.01, 0.01)
    dapo = AlgorithmConfig(name="dapo")
    assert (dapo.clip_range, dapo.clip_range_high, dapo.loss_agg_mode, dapo.kl_coef, dapo.dynamic_sampling) == (
        0.2, 0.28, "token-mean", 0.0, True)
    dr = AlgorithmConfig(name="dr_grpo")
    assert (dr.scale_rewards_by_std, dr.loss_agg_mode) == (False, "seq-mean-token-sum")
    with pytest.raises(UserError, match="dual_clip"):
        algorithm("algorithm.name=gspo", "algorithm.dual_clip=3")  # no token ratio to bound
    with pytest.raises(UserError, match="dynamic_sampling.*max_staleness: 0"):
        algorithm("algorithm.name=dapo", "algorithm.max_staleness=1")
    with pytest.raises(UserError, match="'reinforce_pp' does not use dynamic_sampling"):
        algorithm("algorithm.name=reinforce_pp", "algorithm.dynamic_sampling=true")


def test_refill_sizes_by_hand():
    # keep rate so far 4 of 8: 3 missing need ceil(3 * 8 / 4) = 6 prompts
    assert refill_prompts(3, 4, 8, cap=8) == 6
    assert refill_prompts(3, 1, 8, cap=8) == 8  # 24 wanted, capped at the batch
    assert refill_prompts(5, 7, 8, cap=8) == 6  # ceil(40 / 7) = 6
    assert refill_prompts(3, 0, 8, cap=8) == 8 and refill_prompts(0, 4, 8, cap=8) == 0
    assert refill_prompts(2, 9, 9, cap=8) == 2  # at least the missing ones


def test_fill_groups_counts_refills_by_hand():
    flags = iter([True, False, False, True, False, True, False, False, True, True, False, True])
    calls = []

    def draw(k):
        calls.append(k)
        return [next(flags) for _ in range(k)]

    # draw 4: T F F T -> 2 kept; refill ceil(2 * 4 / 2) = 4: F T F F -> 3 kept of 8;
    # refill ceil(1 * 8 / 3) = 3: T T F -> 5 kept, 1 beyond the 4 wanted
    filled = fill_groups(draw, bool, target=4, max_refills=3)
    assert calls == [4, 4, 3] and filled.groups == [True] * 4
    assert (filled.refills, filled.prompts_drawn, filled.dropped_tied, filled.surplus) == (2, 11, 6, 1)
    assert filled.stats(4)["train/groups_short"] == 0
    flags = iter([True, False, False, True, False, True, False, False])
    calls.clear()
    short = fill_groups(draw, bool, target=4, max_refills=1)  # one refill allowed: 3 groups
    assert calls == [4, 4] and short.stats(4) == {
        "train/refills": 1.0, "train/refill_prompts_drawn": 8.0, "train/groups_dropped_zero_var": 5.0,
        "train/groups_surplus": 0.0, "train/groups_short": 1.0}


def test_scored_groups_split_and_join():
    trajectories = [traj("a", 0, [7]), traj("a", 1, [8]), traj("b", 0, [9]), traj("b", 1, [9])]
    ensemble = aggregate_scores([[1.0, 0.0, 0.5, 0.5], [3.0, 2.0, 1.0, 1.0]], ["m", "n"], "mean", 0.0)
    groups = split_groups(trajectories, ensemble, [1.0, 0.0, 0.5, 0.5])
    assert [g.varied() for g in groups] == [True, False]
    joined, scores = join_groups(groups[1:], ["m", "n"])
    assert [x.prompt_id for x in joined] == ["b", "b"] and scores.member_scores == [[0.5, 0.5], [1.0, 1.0]]
    assert scores.scores == [0.75, 0.75] and join_groups([], ["m", "n"])[1] == EnsembleScores([], [[], []], [], ["m", "n"])
    assert not ScoredGroup([traj("c", 0, [1])], ensemble.take([0]), [1.0]).varied()


class HalfTiedReward(FakeReward):
    """Ties every sample of the prompts whose crc32 is even (score 0); the others score their
    completion's length, so most of their groups vary."""

    def submit(self, prompts, completions, columns=None):
        scores = [0.0 if zlib.crc32(p.encode()) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]
        return FakePending(aggregate_scores([scores], ["half"], "mean", 0.0))


def test_dapo_dynamic_sampling_in_the_driver_refills_with_new_prompts(tmp_path):
    make = fake_services()
    inner = make

    def with_tied_reward(cfg, policy_dir, needs_critic, optimizer_steps):
        services = inner(cfg, policy_dir, needs_critic, optimizer_steps)
        services.reward = HalfTiedReward()
        services.started[2] = services.reward
        return services

    with_tied_reward.made = None
    records, _ = run(tmp_path, "algorithm.name=dapo", "algorithm.total_steps=3", "data.toy_size=64",
                     make=with_tied_reward)
    made = make.made
    draws = iter(made.rollout.generated)
    for record, (_, batch) in zip(records, made.learner.trained, strict=True):
        drawn = [next(draws) for _ in range(int(record["train/refills"]) + 1)]  # the step's first draw and refills
        assert record["train/refill_prompts_drawn"] == sum(len(d) for d in drawn) / 2  # 2 samples a prompt
        assert record["train/refills"] <= 3 and record["train/groups_short"] == 4 - batch.size / 2
        rewards = batch.advantages.abs().sum(dim=1)
        assert bool((rewards > 0).all())  # every trained group's rewards differ: no zero advantage
        assert record["rollout/trajectories"] == batch.size
    assert sum(r["train/refills"] for r in records) >= 1 and next(draws, None) is None
