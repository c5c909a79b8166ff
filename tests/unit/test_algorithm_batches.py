"""Driver algorithms: staleness filter, GRPO / PPO batches, DPO pairs, KL stats, checked
against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from services.core import rl_math
from services.core.batch_types import Trajectory
from services.algorithms import batches as alg

PAD = 0


def traj(prompt_id="a", prompt_ids=(5, 6), response_ids=(7, 8, 9), logprobs=None, version=0, index=0):
    logprobs = [-0.1 * (k + 1) for k in range(len(response_ids))] if logprobs is None else logprobs
    return Trajectory(
        prompt_id=prompt_id, prompt="p", prompt_ids=list(prompt_ids), response="r",
        response_ids=list(response_ids), logprobs=list(logprobs), finish_reason="stop",
        policy_version=version, sample_index=index,
    )


def groups(n_groups, size, response_lens=None):
    """n_groups prompts x size samples; prompt g has g+1 prompt tokens."""
    out = []
    for g in range(n_groups):
        for i in range(size):
            length = response_lens[g * size + i] if response_lens else 2
            out.append(traj(f"q{g}", prompt_ids=[1] * (g + 1), response_ids=[3] * length, index=i))
    return out


# --- staleness --------------------------------------------------------------------------

def test_filter_stale_keeps_recent_and_counts_dropped():
    ts = [traj(version=v) for v in (3, 4, 5)]
    kept, dropped = alg.filter_stale(ts, learner_version=5, max_staleness=1)
    assert [t.policy_version for t in kept] == [4, 5] and dropped == 1
    kept, dropped = alg.filter_stale(ts, learner_version=5, max_staleness=0)
    assert [t.policy_version for t in kept] == [5] and dropped == 2


def test_filter_stale_future_version_is_a_bug():
    with pytest.raises(ValueError, match="newer than the learner"):
        alg.filter_stale([traj(version=6)], learner_version=5, max_staleness=3)


# --- tokens, log-probs, sums, KL ----------------------------------------------------------

def test_build_tokens_and_sampler_logprobs_alignment():
    ts = [traj(prompt_ids=[5, 6], response_ids=[7, 8], logprobs=[-1.0, -2.0]),
          traj(prompt_ids=[4], response_ids=[9], logprobs=[-0.5])]
    tokens = alg.build_tokens(ts, PAD)
    assert tokens.input_ids.tolist() == [[5, 6, 7, 8], [4, 9, 0, 0]]
    assert tokens.response_mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    lp = alg.sampler_logprobs(ts, tokens)
    assert lp.tolist() == [[0.0, 0.0, -1.0, -2.0], [0.0, -0.5, 0.0, 0.0]]
    assert alg.sequence_sums(lp, tokens).tolist() == [-3.0, -0.5]
    with pytest.raises(ValueError, match="2 log-probs for 3 policy tokens"):
        alg.sampler_logprobs([traj(logprobs=[-1.0, -1.0])], alg.build_tokens([traj()], PAD))
    with pytest.raises(ValueError, match="no trajectories"):
        alg.build_tokens([], PAD)


def test_kl_stats_by_hand():
    ts = [traj(prompt_ids=[5, 6], response_ids=[7, 8], logprobs=[-1.0, -2.0]),
          traj(prompt_ids=[4], response_ids=[9], logprobs=[-0.5])]
    tokens = alg.build_tokens(ts, PAD)
    sampler = alg.sampler_logprobs(ts, tokens)
    ref = torch.tensor([[0.0, 0.0, -1.5, -1.0], [0.0, -0.5, 0.0, 0.0]])
    # log-ratios on response tokens: 0.5, -1.0 | 0.0
    k1 = alg.kl_stats(sampler, ref, tokens, "k1")
    assert k1["rollout/kl"] == pytest.approx((0.5 - 1.0 + 0.0) / 3)
    assert k1["rollout/kl_seq"] == pytest.approx((-0.5 + 0.0) / 2)
    k3 = alg.kl_stats(sampler, ref, tokens, "k3")
    by_hand = (math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0) + 0.0
    assert k3["rollout/kl"] == pytest.approx(by_hand / 3, rel=1e-6)
    assert k3["rollout/kl_seq"] == pytest.approx(-0.25)  # always the k1 sum


# --- GRPO ---------------------------------------------------------------------------------

def test_grpo_advantages_2x3_by_hand():
    ts = groups(2, 3)
    rewards = [1.0, 2.0, 3.0, 4.0, 0.0, 2.0]
    # group 0: mean 2, std 1 -> -1, 0, 1;  group 1: mean 2, std 2 -> 1, -1, 0
    batch, stats = alg.grpo_batch(ts, rewards, 3, PAD, scale_by_std=True)
    mask = batch.tokens.response_mask.bool()
    per_seq = [row[m].tolist() for row, m in zip(batch.advantages, mask)]
    expected = [-1.0, 0.0, 1.0, 1.0, -1.0, 0.0]
    for got, want in zip(per_seq, expected):
        assert got == pytest.approx([want, want], abs=1e-5)  # every response token
    assert (batch.advantages[~mask] == 0).all()
    assert stats == {"train/groups_kept": 2.0, "train/groups_dropped_zero_var": 0.0,
                     "reward/group_std_mean": pytest.approx(1.5)}
    # without std scaling: r - mean
    batch, _ = alg.grpo_batch(ts, rewards, 3, PAD, scale_by_std=False)
    got = [row[m][0].item() for row, m in zip(batch.advantages, mask)]
    assert got == pytest.approx([-1.0, 0.0, 1.0, 2.0, -2.0, 0.0])
    # old log-probs default to the sampler's
    assert torch.equal(batch.old_logprobs, alg.sampler_logprobs(ts, batch.tokens))
    assert batch.ref_logprobs is None


def test_grpo_drops_tied_groups_with_matching_rows():
    ts = groups(2, 3, response_lens=[2, 2, 2, 4, 4, 4])
    tokens = alg.build_tokens(ts, PAD)
    old = torch.arange(6 * 6, dtype=torch.float32).view(6, 6)
    ref = -old
    rewards = [1.0, 2.0, 3.0, 5.0, 5.0, 5.0]
    batch, stats = alg.grpo_batch(ts, rewards, 3, PAD, drop_zero_variance=True, old_logprobs=old, ref_logprobs=ref)
    assert stats["train/groups_kept"] == 1.0 and stats["train/groups_dropped_zero_var"] == 1.0
    assert stats["reward/group_std_mean"] == pytest.approx(0.5)
    assert batch.tokens.size == 3
    width = 1 + 2  # group 0: 1 prompt token + 2 response tokens; padding of group 1 trimmed
    assert batch.tokens.input_ids.tolist() == tokens.input_ids[:3, :width].tolist()
    assert torch.equal(batch.old_logprobs, old[:3, :width])
    assert torch.equal(batch.ref_logprobs, ref[:3, :width])
    # kept without the flag: the tied group has zero advantages
    batch, stats = alg.grpo_batch(ts, rewards, 3, PAD, drop_zero_variance=False)
    assert batch.tokens.size == 6 and (batch.advantages[3:] == 0).all()
    # everything tied -> no batch
    batch, stats = alg.grpo_batch(ts, [1.0] * 3 + [5.0] * 3, 3, PAD, drop_zero_variance=True)
    assert batch is None and stats["train/groups_dropped_zero_var"] == 2.0


def test_grpo_validates_inputs():
    ts = groups(2, 3)
    with pytest.raises(ValueError, match="5 rewards for 6"):
        alg.grpo_batch(ts, [0.0] * 5, 3, PAD)
    with pytest.raises(ValueError, match="groups of 4"):
        alg.grpo_batch(ts, [0.0] * 6, 4, PAD)
    with pytest.raises(ValueError, match="mixes prompts"):
        alg.grpo_batch(ts, [0.0] * 6, 2, PAD)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        alg.grpo_batch(ts, [0.0] * 6, 3, PAD, old_logprobs=torch.zeros(6, 2))


# --- PPO ----------------------------------------------------------------------------------

def ppo_inputs(ts, old_resp=None, ref_resp=None, values_resp=None):
    tokens = alg.build_tokens(ts, PAD)
    shape = tokens.input_ids.shape
    mask = tokens.response_mask.bool()

    def place(rows):
        out = torch.zeros(shape)
        if rows is not None:
            for i, row in enumerate(rows):
                out[i, mask[i]] = torch.tensor(row)
        return out

    return place(values_resp), place(ref_resp), place(old_resp)


def test_ppo_terminal_score_gamma1_lam1_zero_values():
    ts = [traj(prompt_ids=[5, 6], response_ids=[7, 8, 9])]
    values, ref, old = ppo_inputs(ts, old_resp=[[-1.0, -2.0, -0.5]], ref_resp=[[-1.5, -1.0, -0.5]])
    batch, stats = alg.ppo_batch(ts, [2.0], values, ref, old, 1.0, 1.0, 0.1, "k1", False, PAD,
                                 whiten_advantages=False)
    assert batch.advantages.tolist() == [[0.0, 0.0, 2.0, 2.0, 2.0]]
    assert batch.returns.tolist() == [[0.0, 0.0, 2.0, 2.0, 2.0]]
    assert torch.equal(batch.ref_logprobs, ref)  # KL is a loss term
    assert torch.equal(batch.old_values, values) and torch.equal(batch.old_logprobs, old)
    assert stats["reward/kl_penalty_mean"] == 0.0 and stats["reward/score_mean"] == 2.0


def test_ppo_kl_in_reward_by_hand():
    ts = [traj(prompt_ids=[5, 6], response_ids=[7, 8, 9])]
    values, ref, old = ppo_inputs(ts, old_resp=[[-1.0, -2.0, -0.5]], ref_resp=[[-1.5, -1.0, -0.5]])
    batch, stats = alg.ppo_batch(ts, [2.0], values, ref, old, 1.0, 1.0, 0.1, "k1", True, PAD,
                                 whiten_advantages=False)
    # k1 = 0.5, -1.0, 0.0 -> penalties 0.05, -0.1, 0 -> rewards -0.05, 0.1, 2.0
    # gamma = lam = 1, V = 0: A_t = sum of rewards from t on
    assert batch.advantages[0, 2:].tolist() == pytest.approx([2.05, 2.1, 2.0])
    assert batch.returns[0, 2:].tolist() == pytest.approx([2.05, 2.1, 2.0])
    assert batch.ref_logprobs is None
    assert stats["reward/kl_penalty_mean"] == pytest.approx(-0.05)
    assert stats["reward/total_mean"] == pytest.approx(2.05)


def test_ppo_gae_with_values_by_hand():
    ts = [traj(prompt_ids=[5], response_ids=[7, 8])]
    values, ref, old = ppo_inputs(ts, values_resp=[[1.0, 0.5]])
    batch, _ = alg.ppo_batch(ts, [1.0], values, ref, old, 1.0, 0.5, 0.0, "k3", False, PAD,
                             whiten_advantages=False)
    # last: delta = 1 - 0.5 = 0.5 = A;  first: delta = 0 + 0.5 - 1 = -0.5, A = -0.5 + 0.5*0.5
    assert batch.advantages[0].tolist() == pytest.approx([0.0, -0.25, 0.5])
    assert batch.returns[0].tolist() == pytest.approx([0.0, 0.75, 1.0])


def test_ppo_score_at_last_token_with_padding_and_whitening():
    ts = [traj(prompt_ids=[5, 6], response_ids=[7, 8, 9]), traj(prompt_ids=[4], response_ids=[9]),
          traj(prompt_ids=[4, 4], response_ids=[], logprobs=[])]
    values, ref, old = ppo_inputs(ts)
    raw, stats = alg.ppo_batch(ts, [2.0, -1.0, 5.0], values, ref, old, 1.0, 1.0, 0.0, "k3", False, PAD,
                               whiten_advantages=False)
    assert raw.advantages.tolist() == [[0, 0, 2, 2, 2], [0, -1, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert stats["train/empty_responses"] == 1.0
    white, _ = alg.ppo_batch(ts, [2.0, -1.0, 5.0], values, ref, old, 1.0, 1.0, 0.0, "k3", False, PAD)
    mask = white.tokens.response_mask.bool()
    assert torch.allclose(white.advantages, rl_math.masked_whiten(raw.advantages, mask))
    assert rl_math.masked_mean(white.advantages, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert rl_math.masked_var(white.advantages, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(white.returns, raw.returns)  # returns are never whitened
    with pytest.raises(ValueError, match="values has shape"):
        alg.ppo_batch(ts, [0.0] * 3, values[:, :2], ref, old, 1.0, 1.0, 0.0, "k3", False, PAD)


# --- online DPO ---------------------------------------------------------------------------

def test_dpo_pairs_best_vs_worst_ties_dropped():
    ts = groups(3, 3)
    scores = [0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 1.0, -1.0, 1.0]
    chosen, rejected, stats = alg.dpo_pairs(ts, scores, 3, PAD)
    assert [ts.index(t) for t in chosen] == [1, 6]  # first of the tied best
    assert [ts.index(t) for t in rejected] == [0, 7]
    assert stats == {"train/pairs": 2.0, "train/pairs_dropped_ties": 1.0,
                     "reward/pair_margin_mean": pytest.approx((0.8 + 2.0) / 2)}
    chosen, rejected, stats = alg.dpo_pairs(ts, [0.0] * 9, 3, PAD)
    assert chosen == [] and rejected == [] and stats["reward/pair_margin_mean"] == 0.0
    with pytest.raises(ValueError, match="group_size >= 2"):
        alg.dpo_pairs(ts, scores, 1, PAD)


def test_dpo_batch_fields():
    ts = groups(2, 2, response_lens=[1, 3, 2, 2])
    chosen, rejected = [ts[1], ts[2]], [ts[0], ts[3]]
    batch = alg.dpo_batch(chosen, rejected, [-1.0, -2.0], torch.tensor([-3.0, -4.0]), PAD)
    assert batch.chosen.input_ids.tolist() == alg.build_tokens(chosen, PAD).input_ids.tolist()
    assert batch.rejected.response_mask.sum(dim=-1).tolist() == [1.0, 2.0]
    assert batch.ref_chosen_logps.tolist() == [-1.0, -2.0]
    assert batch.ref_rejected_logps.tolist() == [-3.0, -4.0]
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        alg.dpo_batch(chosen, rejected, [-1.0], [-3.0, -4.0], PAD)
    with pytest.raises(ValueError, match="chosen prompt"):
        alg.dpo_batch(chosen, [ts[2], ts[0]], [-1.0, -2.0], [-3.0, -4.0], PAD)
