"""Unit tests for services.core.rl_math.

Expected numbers come either from hand arithmetic (written in comments) or from
slow pure-Python reference loops over floats that do not call the code under test.
"""

from __future__ import annotations

import ast
import math
import random
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from services.core import rl_math as rm

NAN = float("nan")
INF = float("inf")
LN2 = math.log(2.0)


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def rand_mask(rng: random.Random, B: int, T: int):
    """Random masks with left padding, a gap and right padding (lists of 0/1)."""
    rows = []
    for _ in range(B):
        row = [0] * T
        start = rng.randint(0, T // 3)
        end = rng.randint(start + 1, T)
        for i in range(start, end):
            row[i] = 1
        if end - start > 3 and rng.random() < 0.7:  # punch a masked gap inside
            row[rng.randint(start + 1, end - 2)] = 0
        rows.append(row)
    return rows


def poison(x: torch.Tensor, mask: torch.Tensor, value=NAN) -> torch.Tensor:
    """Put garbage on masked positions: results must not depend on it."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ---------------------------------------------------------------------------
# import hygiene
# ---------------------------------------------------------------------------

def test_module_imports_only_torch_math_typing():
    src = Path(rm.__file__).read_text()
    roots = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "math", "typing", "__future__"}, roots


# ---------------------------------------------------------------------------
# masked reductions
# ---------------------------------------------------------------------------

X = [[1.0, NAN, 3.0], [INF, 5.0, 6.0]]
M = [[1, 0, 1], [0, 1, 1]]


def test_masked_sum_hand():
    x, m = t(X), t(M)
    # valid: 1, 3, 5, 6
    assert_close(rm.masked_sum(x, m), t(15.0))  # 1+3+5+6
    assert_close(rm.masked_sum(x, m, dim=-1), t([4.0, 11.0]))  # [1+3, 5+6]
    assert_close(rm.masked_sum(x, m, dim=0), t([1.0, 5.0, 9.0]))  # [1, 5, 3+6]
    assert_close(rm.masked_sum(x, m.bool()), t(15.0))


def test_masked_mean_hand():
    x, m = t(X), t(M)
    assert_close(rm.masked_mean(x, m), t(3.75))  # 15 / 4
    assert_close(rm.masked_mean(x, m, dim=-1), t([2.0, 5.5]))  # 4/2, 11/2
    # fully masked row -> 0, not NaN
    m2 = t([[1, 0, 1], [0, 0, 0]])
    assert_close(rm.masked_mean(x, m2, dim=-1), t([2.0, 0.0]))


def test_masked_var_hand():
    x, m = t(X), t(M)
    # values 1,3,5,6; mean 3.75; dev^2 = 7.5625+0.5625+1.5625+5.0625 = 14.75
    assert_close(rm.masked_var(x, m), t(14.75 / 3))
    assert_close(rm.masked_var(x, m, unbiased=False), t(14.75 / 4))
    # a single valid element: variance 0 (no NaN)
    assert_close(rm.masked_var(x, t([[1, 0, 0], [0, 0, 0]])), t(0.0))


def test_masked_whiten_vs_loop():
    rng = random.Random(0)
    B, T = 3, 7
    mask_l = rand_mask(rng, B, T)
    x_l = [[rng.gauss(2.0, 3.0) for _ in range(T)] for _ in range(B)]
    vals = [x_l[b][i] for b in range(B) for i in range(T) if mask_l[b][i]]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    eps = 1e-8
    exp_shift = [[(x_l[b][i] - mean) / math.sqrt(var + eps) if mask_l[b][i] else 0.0
                  for i in range(T)] for b in range(B)]
    exp_noshift = [[exp_shift[b][i] + mean if mask_l[b][i] else 0.0
                    for i in range(T)] for b in range(B)]
    m = t(mask_l)
    x = poison(t(x_l), m)
    assert_close(rm.masked_whiten(x, m), t(exp_shift))
    assert_close(rm.masked_whiten(x, m, shift_mean=False), t(exp_noshift))
    w = rm.masked_whiten(x, m)
    assert_close(rm.masked_mean(w, m), t(0.0), atol=1e-10, rtol=0)
    assert_close(rm.masked_var(w, m), t(1.0), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# aggregate_loss
# ---------------------------------------------------------------------------

def test_aggregate_loss_hand():
    loss = t([[1.0, 2.0, NAN], [4.0, NAN, NAN], [NAN, NAN, NAN]])
    m = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # token-mean: (1+2+4)/3
    assert_close(rm.aggregate_loss(loss, m, "token-mean"), t(7.0 / 3))
    # seq-mean-token-mean: rows (1+2)/2=1.5, 4/1=4; empty row ignored -> (1.5+4)/2
    assert_close(rm.aggregate_loss(loss, m, "seq-mean-token-mean"), t(2.75))
    # seq-mean-token-sum: rows 3, 4 -> 3.5
    assert_close(rm.aggregate_loss(loss, m, "seq-mean-token-sum"), t(3.5))


def test_aggregate_loss_all_masked_is_zero():
    loss = t([[1.0, 2.0]])
    m = t([[0, 0]])
    for mode in rm.AGG_MODES:
        assert_close(rm.aggregate_loss(loss, m, mode), t(0.0))


def test_aggregate_loss_vs_loop():
    rng = random.Random(1)
    B, T = 5, 9
    mask_l = rand_mask(rng, B, T)
    l_l = [[rng.uniform(-2, 2) for _ in range(T)] for _ in range(B)]
    tok_sum = [sum(l_l[b][i] for i in range(T) if mask_l[b][i]) for b in range(B)]
    tok_cnt = [sum(mask_l[b]) for b in range(B)]
    exp = {
        "token-mean": sum(tok_sum) / sum(tok_cnt),
        "seq-mean-token-mean": sum(s / c for s, c in zip(tok_sum, tok_cnt)) / B,
        "seq-mean-token-sum": sum(tok_sum) / B,
    }
    m = t(mask_l)
    x = poison(t(l_l), m)
    for mode, e in exp.items():
        assert_close(rm.aggregate_loss(x, m, mode), t(e))


def test_aggregate_loss_bad_mode():
    with pytest.raises(ValueError) as ei:
        rm.aggregate_loss(t([[1.0]]), t([[1]]), "token-sum")
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert mode in str(ei.value)


# ---------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------

def test_kl_estimate_hand():
    lp = t([math.log(0.5), math.log(0.5), math.log(0.25)])
    ref = t([math.log(0.5), math.log(0.25), math.log(0.5)])
    # log_ratio = [0, ln2, -ln2]
    assert_close(rm.kl_estimate(lp, ref, "k1"), t([0.0, LN2, -LN2]))
    assert_close(rm.kl_estimate(lp, ref, "k2"), t([0.0, 0.5 * LN2**2, 0.5 * LN2**2]))
    # k3(ln2) = e^-ln2 - 1 + ln2 = 0.5 - 1 + 0.693147 = 0.193147
    # k3(-ln2) = e^ln2 - 1 - ln2 = 2 - 1 - 0.693147 = 0.306853
    assert_close(rm.kl_estimate(lp, ref, "k3"), t([0.0, 0.5 - 1 + LN2, 2 - 1 - LN2]))


def test_kl_estimate_unbiased_monte_carlo():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[idx], q.log()[idx]
    k1 = rm.kl_estimate(lp, lq, "k1").mean()
    k3 = rm.kl_estimate(lp, lq, "k3")
    assert abs(k1.item() - true_kl) < 0.01
    assert abs(k3.mean().item() - true_kl) < 0.01
    assert (k3 >= 0).all()


def test_kl_estimate_bad_kind():
    with pytest.raises(ValueError):
        rm.kl_estimate(t([0.0]), t([0.0]), "k4")


# ---------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------

def test_gae_hand_three_tokens():
    gamma, lam = 0.9, 0.8
    r = t([[0.0, 0.0, 1.0]])
    v = t([[0.5, 0.6, 0.7]])
    m = t([[1, 1, 1]])
    # t=2: delta = 1 + 0.9*0 - 0.7 = 0.3;            A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03;         A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04;         A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    adv, ret = rm.gae_advantages(r, v, m, gamma, lam)
    assert_close(adv, t([[0.21712, 0.246, 0.3]]))
    assert_close(ret, t([[0.71712, 0.846, 1.0]]))


def test_gae_padding_and_gap_match_dense():
    gamma, lam = 0.9, 0.8
    # same three tokens as above, placed at positions 1, 3, 4 with garbage elsewhere
    m = t([[0, 1, 0, 1, 1, 0]])
    r = poison(t([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]), m)
    v = poison(t([[0.0, 0.5, 0.0, 0.6, 0.7, 0.0]]), m, value=100.0)
    adv, ret = rm.gae_advantages(r, v, m, gamma, lam)
    assert_close(adv, t([[0.0, 0.21712, 0.0, 0.246, 0.3, 0.0]]))
    assert_close(ret, t([[0.0, 0.71712, 0.0, 0.846, 1.0, 0.0]]))


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    r = t([[1.0, 2.0, 3.0]])
    v = t([[0.5, 0.5, 0.5]])
    m = t([[1, 1, 1]])
    adv, ret = rm.gae_advantages(r, v, m, 1.0, 1.0)
    # reward-to-go = [6, 5, 3]
    assert_close(ret, t([[6.0, 5.0, 3.0]]))
    assert_close(adv, t([[5.5, 4.5, 2.5]]))


def _gae_ref(r, v, m, gamma, lam):
    B, T = len(r), len(r[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [i for i in range(T) if m[b][i]]
        next_v, next_a = 0.0, 0.0
        for i in reversed(idx):
            delta = r[b][i] + gamma * next_v - v[b][i]
            a = delta + gamma * lam * next_a
            adv[b][i] = a
            ret[b][i] = a + v[b][i]
            next_v, next_a = v[b][i], a
    return adv, ret


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_vs_loop_random_masks(seed):
    rng = random.Random(seed)
    B, T = 6, 12
    gamma, lam = rng.uniform(0.8, 1.0), rng.uniform(0.5, 1.0)
    mask_l = rand_mask(rng, B, T)
    r_l = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    v_l = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    exp_a, exp_r = _gae_ref(r_l, v_l, mask_l, gamma, lam)
    m = t(mask_l)
    adv, ret = rm.gae_advantages(poison(t(r_l), m), poison(t(v_l), m), m.bool(), gamma, lam)
    assert_close(adv, t(exp_a))
    assert_close(ret, t(exp_r))


# ---------------------------------------------------------------------------
# group advantages
# ---------------------------------------------------------------------------

def test_grpo_hand():
    r = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    # group 1: mean 0.5, unbiased var = 4*0.25/3 = 1/3, std = 0.57735 -> +-0.5/0.57735 = +-0.866025
    # group 2: mean 2.75, dev = -.75,-.75,-.75,2.25, var = 6.75/3 = 2.25, std 1.5
    #          -> -0.5, -0.5, -0.5, 1.5
    s3 = math.sqrt(3.0) / 2  # 0.866025
    adv = rm.grpo_advantages(r, 4, eps=0.0)
    assert_close(adv, t([s3, -s3, -s3, s3, -0.5, -0.5, -0.5, 1.5]))
    # no std scaling: r - mean
    assert_close(rm.grpo_advantages(r, 4, scale_by_std=False),
                 t([0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]))
    assert_close(rm.group_reward_std(r, 4), t([1 / math.sqrt(3.0), 1.5]))


def test_grpo_zero_variance_group_and_size_one():
    r = t([3.0, 3.0, 1.0, 2.0])
    # group [3, 3]: 0/(0+eps) = 0; group [1, 2]: mean 1.5, std = sqrt(0.5) -> -+0.5/0.707107
    a = rm.grpo_advantages(r, 2, eps=0.0 + 1e-6)
    assert_close(a[:2], t([0.0, 0.0]))
    assert_close(a[2:], t([-0.5, 0.5]) / (math.sqrt(0.5) + 1e-6))
    assert_close(rm.group_reward_std(r, 2), t([0.0, math.sqrt(0.5)]))
    assert_close(rm.grpo_advantages(r, 1), t([0.0, 0.0, 0.0, 0.0]))
    assert_close(rm.group_reward_std(r, 1), t([0.0, 0.0, 0.0, 0.0]))


def test_grpo_vs_loop():
    rng = random.Random(3)
    G, n_groups, eps = 5, 4, 1e-6
    r_l = [rng.gauss(0, 2) for _ in range(G * n_groups)]
    exp, exp_std = [], []
    for g in range(n_groups):
        grp = r_l[g * G:(g + 1) * G]
        mu = sum(grp) / G
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / (G - 1))
        exp_std.append(sd)
        exp.extend((x - mu) / (sd + eps) for x in grp)
    assert_close(rm.grpo_advantages(t(r_l), G, eps=eps), t(exp))
    assert_close(rm.group_reward_std(t(r_l), G), t(exp_std))


def test_grpo_bad_group_size():
    with pytest.raises(ValueError):
        rm.grpo_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError):
        rm.group_reward_std(t([1.0, 2.0, 3.0]), 2)


def test_rloo_hand():
    r = t([1.0, 2.0, 3.0, 6.0, 0.0, 1.0, 0.0, 1.0])
    # group [1,2,3,6]: baselines 11/3, 10/3, 9/3, 6/3 -> -8/3, -4/3, 0, 4
    # group [0,1,0,1]: baselines 2/3, 1/3, 2/3, 1/3 -> -2/3, 2/3, -2/3, 2/3
    exp = t([-8 / 3, -4 / 3, 0.0, 4.0, -2 / 3, 2 / 3, -2 / 3, 2 / 3])
    assert_close(rm.rloo_advantages(r, 4), exp)


def test_rloo_vs_loop():
    rng = random.Random(4)
    G = 3
    r_l = [rng.gauss(0, 1) for _ in range(G * 5)]
    exp = []
    for g in range(5):
        grp = r_l[g * G:(g + 1) * G]
        for i, x in enumerate(grp):
            others = [y for j, y in enumerate(grp) if j != i]
            exp.append(x - sum(others) / len(others))
    assert_close(rm.rloo_advantages(t(r_l), G), t(exp))


def test_rloo_errors():
    with pytest.raises(ValueError):
        rm.rloo_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError):
        rm.rloo_advantages(t([1.0, 2.0, 3.0]), 2)


# ---------------------------------------------------------------------------
# PPO policy loss
# ---------------------------------------------------------------------------

def test_ppo_policy_loss_hand():
    ratios = [1.5, 0.5, 1.1, 0.7]
    lp = t([[math.log(x) for x in ratios] + [NAN]]).requires_grad_(True)
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    adv = t([[1.0, 1.0, -1.0, -1.0, NAN]])
    m = t([[1, 1, 1, 1, 0]])
    # tok0 r=1.5 A=+1: pg1=-1.5, pg2=-1.2 -> -1.2 (clipped)
    # tok1 r=0.5 A=+1: pg1=-0.5, pg2=-0.8 -> -0.5
    # tok2 r=1.1 A=-1: pg1= 1.1, pg2= 1.1 -> 1.1 (tie, not counted as clipped)
    # tok3 r=0.7 A=-1: pg1= 0.7, pg2= 0.8 -> 0.8 (clipped)
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05
    loss, stats = rm.ppo_policy_loss(lp, old, adv, m, clip_low=0.2)
    assert_close(loss, t(0.05))
    assert_close(stats["clip_frac"], torch.tensor(0.5))
    assert_close(stats["ratio_mean"], torch.tensor(0.95))  # 3.8 / 4
    exp_kl = sum(0.5 * math.log(x) ** 2 for x in ratios) / 4
    assert_close(stats["approx_kl"], torch.tensor(exp_kl, dtype=torch.float32))
    loss.backward()
    # d/dlp of -A*exp(lp) = -A*ratio, /4 for the mean; clipped tokens have zero grad
    assert_close(lp.grad, t([[0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0]]))


def test_ppo_asymmetric_and_dual_clip_hand():
    ratios = [1.5, 5.0, 2.0, 0.5]
    lp = t([[math.log(x) for x in ratios]])
    old = torch.zeros_like(lp)
    adv = t([[1.0, -1.0, -1.0, -1.0]])
    m = t([[1, 1, 1, 1]])
    # clip_low=0.2, clip_high=0.3:
    # tok0 r=1.5 A=+1: pg1=-1.5, pg2=-1.3 -> -1.3 (clipped)
    # tok1 r=5   A=-1: pg1= 5,   pg2= 1.3 -> 5
    # tok2 r=2   A=-1: pg1= 2,   pg2= 1.3 -> 2
    # tok3 r=0.5 A=-1: pg1= 0.5, pg2= 0.8 -> 0.8 (clipped)
    loss, st = rm.ppo_policy_loss(lp, old, adv, m, clip_low=0.2, clip_high=0.3)
    assert_close(loss, t((-1.3 + 5 + 2 + 0.8) / 4))
    assert_close(st["clip_frac"], torch.tensor(0.5))
    # dual clip c=3 (A<0 only): tok1 min(5, 3) = 3; tok2 min(2, 3) = 2; tok3 min(0.8, 3) = 0.8
    loss, st = rm.ppo_policy_loss(lp, old, adv, m, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    assert_close(loss, t((-1.3 + 3 + 2 + 0.8) / 4))
    assert_close(st["dual_clip_frac"], torch.tensor(0.25))


def test_truncated_is_weights_hand():
    old = t([[math.log(0.5), math.log(0.2), math.log(0.9)]])
    sampler = t([[math.log(0.25), math.log(0.4), math.log(0.1)]])
    # ratios pi_old / pi_sampler = 2, 0.5, 9 -> capped at 3: 2, 0.5, 3
    assert_close(rm.truncated_is_weights(old, sampler, cap=3.0), t([[2.0, 0.5, 3.0]]))
    with pytest.raises(ValueError, match="cap"):
        rm.truncated_is_weights(old, sampler, cap=0.0)


def test_ppo_policy_loss_with_is_weights_hand():
    # the tokens of test_ppo_policy_loss_hand, losses -1.2, -0.5, 1.1, 0.8, weighted 2, 0.5, 1, 3
    ratios = [1.5, 0.5, 1.1, 0.7]
    lp = t([[math.log(x) for x in ratios] + [NAN]]).requires_grad_(True)
    old = torch.zeros(1, 5)
    adv = t([[1.0, 1.0, -1.0, -1.0, NAN]])
    m = t([[1, 1, 1, 1, 0]])
    weights = t([[2.0, 0.5, 1.0, 3.0, NAN]])
    loss, stats = rm.ppo_policy_loss(lp, old, adv, m, clip_low=0.2, is_weights=weights)
    assert_close(loss, t((-1.2 * 2 - 0.5 * 0.5 + 1.1 + 0.8 * 3) / 4))  # 0.2125
    loss.backward()
    # the weights scale the gradient and carry none themselves
    assert_close(lp.grad, t([[0.0, -0.5 * 0.5 / 4, 1.1 / 4, 0.0, 0.0]]))
    assert_close(stats["clip_frac"], torch.tensor(0.5))


def test_logprob_gap_stats_hand():
    learner = t([[0.0, -1.0, -2.0, -0.5], [-1.0, -3.0, 0.0, 0.0]])
    sampler = t([[0.0, -1.5, -0.5, -0.5], [-0.2, -3.0, NAN, 9.0]])
    m = t([[0, 1, 1, 1], [1, 1, 0, 0]])
    # masked gaps: 0.5, -1.5, 0.0, -0.8, 0.0; |gap| max 1.5, mean 2.8 / 5;
    # ratio exp(gap) outside [0.5, 2] when gap < -0.693 or > 0.693: -1.5 and -0.8 -> 2 of 5
    stats = rm.logprob_gap_stats(learner, sampler, m)
    assert stats["max"] == pytest.approx(1.5)
    assert stats["mean"] == pytest.approx(2.8 / 5)
    assert stats["ratio_outside"] == pytest.approx(0.4)
    assert rm.logprob_gap_stats(learner, sampler, torch.zeros(2, 4)) == {"max": 0.0, "mean": 0.0, "ratio_outside": 0.0}


def test_ppo_sequence_level_advantages_broadcast():
    lp = t([[0.1, -0.3], [0.2, 0.0]])
    old = t([[0.0, 0.0], [0.1, 0.1]])
    m = t([[1, 1], [1, 0]])
    adv_seq = t([2.0, -1.0])
    a = rm.ppo_policy_loss(lp, old, adv_seq, m)
    b = rm.ppo_policy_loss(lp, old, adv_seq[:, None].expand(2, 2).clone(), m)
    assert_close(a[0], b[0])


def _ppo_ref(lp, old, adv, m, cl, ch, dual, mode):
    B, T = len(lp), len(lp[0])
    tok = [[0.0] * T for _ in range(B)]
    n_clip, n_dual, n_tok = 0, 0, 0
    for b in range(B):
        for i in range(T):
            if not m[b][i]:
                continue
            ratio = math.exp(lp[b][i] - old[b][i])
            A = adv[b][i]
            pg1 = -A * ratio
            pg2 = -A * min(max(ratio, 1 - cl), 1 + ch)
            x = max(pg1, pg2)
            if dual is not None and A < 0 and -A * dual < x:
                x = -A * dual
                n_dual += 1
            tok[b][i] = x
            n_tok += 1
            n_clip += pg2 > pg1
    sums = [sum(tok[b][i] for i in range(T) if m[b][i]) for b in range(B)]
    cnts = [sum(1 for i in range(T) if m[b][i]) for b in range(B)]
    valid = [b for b in range(B) if cnts[b] > 0]
    if mode == "token-mean":
        loss = sum(sums) / sum(cnts)
    elif mode == "seq-mean-token-mean":
        loss = sum(sums[b] / cnts[b] for b in valid) / len(valid)
    else:
        loss = sum(sums[b] for b in valid) / len(valid)
    return loss, n_clip / n_tok, n_dual / n_tok


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("dual", [None, 1.5])
def test_ppo_policy_loss_vs_loop(mode, dual):
    rng = random.Random(len(mode) * 10 + (0 if dual is None else 1))
    B, T = 5, 8
    mask_l = rand_mask(rng, B, T)
    mask_l[-1] = [0] * T  # one fully masked sequence
    lp_l = [[rng.gauss(-1, 0.5) for _ in range(T)] for _ in range(B)]
    old_l = [[x + rng.gauss(0, 0.8) for x in row] for row in lp_l]
    adv_l = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    exp_loss, exp_clip, exp_dual = _ppo_ref(lp_l, old_l, adv_l, mask_l, 0.2, 0.28, dual, mode)
    m = t(mask_l)
    loss, st = rm.ppo_policy_loss(poison(t(lp_l), m), poison(t(old_l), m), poison(t(adv_l), m),
                                  m, clip_low=0.2, clip_high=0.28, dual_clip=dual, agg_mode=mode)
    assert_close(loss, t(exp_loss))
    assert_close(st["clip_frac"], torch.tensor(exp_clip))
    assert_close(st["dual_clip_frac"], torch.tensor(exp_dual))
    if dual is not None:
        assert exp_dual > 0  # the dual-clip branch is actually exercised


def test_ppo_masked_nan_gives_finite_grads():
    m = t([[1, 0, 1]])
    lp = t([[-0.5, NAN, -1.0]]).requires_grad_(True)
    loss, _ = rm.ppo_policy_loss(lp, t([[-0.4, NAN, -1.2]]), t([[1.0, NAN, -2.0]]), m)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert lp.grad[0, 1] == 0


def test_ppo_errors():
    x = t([[0.0]])
    with pytest.raises(ValueError):
        rm.ppo_policy_loss(x, x, x, t([[1]]), dual_clip=1.0)
    with pytest.raises(ValueError):
        rm.ppo_policy_loss(x, x, x, t([[1]]), agg_mode="bogus")


# ---------------------------------------------------------------------------
# value loss
# ---------------------------------------------------------------------------

def test_value_loss_hand():
    v = t([[1.0, 2.9, NAN]])
    old = t([[0.0, 2.0, NAN]])
    R = t([[0.0, 3.0, NAN]])
    m = t([[1, 1, 0]])
    # tok0: (v-R)^2 = 1;    v_clip = 0 + clamp(1, +-0.5) = 0.5   -> 0.25; max 1    -> 0.5
    # tok1: (v-R)^2 = 0.01; v_clip = 2 + clamp(0.9, +-0.5) = 2.5 -> 0.25; max 0.25 -> 0.125 (clipped)
    loss, st = rm.value_loss(v, old, R, m, clip_range=0.5)
    assert_close(loss, t((0.5 + 0.125) / 2))
    assert_close(st["clip_frac"], torch.tensor(0.5))
    # no clipping: 0.5 * (1 + 0.01) / 2 = 0.2525
    loss, st = rm.value_loss(v, old, R, m)
    assert_close(loss, t(0.2525))
    assert_close(st["clip_frac"], torch.tensor(0.0))


def test_value_loss_vs_loop():
    rng = random.Random(7)
    B, T, c = 4, 6, 0.3
    mask_l = rand_mask(rng, B, T)
    v_l = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    o_l = [[x + rng.gauss(0, 0.5) for x in row] for row in v_l]
    r_l = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    tot, n, n_clip = 0.0, 0, 0
    for b in range(B):
        for i in range(T):
            if mask_l[b][i]:
                d = v_l[b][i] - o_l[b][i]
                vc = o_l[b][i] + min(max(d, -c), c)
                u, cl = (v_l[b][i] - r_l[b][i]) ** 2, (vc - r_l[b][i]) ** 2
                tot += 0.5 * max(u, cl)
                n += 1
                n_clip += cl > u
    m = t(mask_l)
    loss, st = rm.value_loss(poison(t(v_l), m), poison(t(o_l), m), poison(t(r_l), m), m,
                             clip_range=c)
    assert_close(loss, t(tot / n))
    assert_close(st["clip_frac"], torch.tensor(n_clip / n))


# ---------------------------------------------------------------------------
# logits helpers
# ---------------------------------------------------------------------------

def test_entropy_hand():
    # uniform over 4 -> ln 4; p = [.5, .25, .25] -> .5 ln2 + 2*.25 ln4 = 1.5 ln2
    logits = t([[[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -INF]]])
    assert_close(rm.entropy_from_logits(logits), t([[math.log(4.0), 1.5 * LN2]]))


def test_entropy_stable_and_finite_grad():
    logits = t([[0.0, -INF], [1000.0, 1000.0]]).requires_grad_(True)
    h = rm.entropy_from_logits(logits)
    assert_close(h, t([0.0, LN2]))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_vs_loop():
    rng = random.Random(8)
    B, T, V = 2, 3, 7
    lg = [[[rng.gauss(0, 3) for _ in range(V)] for _ in range(T)] for _ in range(B)]
    exp = []
    for b in range(B):
        row = []
        for i in range(T):
            mx = max(lg[b][i])
            z = sum(math.exp(x - mx) for x in lg[b][i])
            ps = [math.exp(x - mx) / z for x in lg[b][i]]
            row.append(-sum(p * math.log(p) for p in ps))
        exp.append(row)
    assert_close(rm.entropy_from_logits(t(lg)), t(exp))
    assert_close(rm.entropy_from_logits(t(lg, torch.float32)), t(exp, torch.float32))


def test_logprobs_from_logits_hand_and_loop():
    # logits [0, ln3] -> softmax [1/4, 3/4]
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    ids = torch.tensor([[1, 0]])
    assert_close(rm.logprobs_from_logits(logits, ids), t([[math.log(0.75), math.log(0.25)]]))

    rng = random.Random(9)
    B, T, V = 2, 4, 6
    lg = [[[rng.gauss(0, 2) for _ in range(V)] for _ in range(T)] for _ in range(B)]
    ids_l = [[rng.randrange(V) for _ in range(T)] for _ in range(B)]
    exp = [[lg[b][i][ids_l[b][i]] - math.log(sum(math.exp(x) for x in lg[b][i]))
            for i in range(T)] for b in range(B)]
    out = rm.logprobs_from_logits(t(lg), torch.tensor(ids_l))
    assert out.shape == (B, T)
    assert_close(out, t(exp))
    bf = rm.logprobs_from_logits(t(lg, torch.bfloat16), torch.tensor(ids_l))
    assert bf.dtype == torch.float32
    assert_close(bf, t(exp, torch.float32), atol=0.05, rtol=0)


# ---------------------------------------------------------------------------
# preference losses
# ---------------------------------------------------------------------------

def test_dpo_sigmoid_hand():
    pc, pr = t([-10.0, -5.0]), t([-12.0, -5.0])
    rc, rr = t([-11.0, -4.0]), t([-11.0, -6.0])
    # ex0: pc-rc = 1, pr-rr = -1, h = 2;   -logsigmoid(0.2)  = log(1+e^-0.2) = 0.598138869
    # ex1: pc-rc = -1, pr-rr = 1, h = -2;  -logsigmoid(-0.2) = log(1+e^0.2)  = 0.798138869
    loss, st = rm.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(loss, t((0.598138869 + 0.798138869) / 2))
    assert_close(st["chosen_rewards"], t([0.1, -0.1]))
    assert_close(st["rejected_rewards"], t([-0.1, 0.1]))
    assert_close(st["margins"], t([0.2, -0.2]))
    assert_close(st["accuracy"], torch.tensor(0.5))
    # label smoothing 0.1 on ex0: 0.9*0.598138869 + 0.1*0.798138869 = 0.618138869
    loss, _ = rm.dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.1, label_smoothing=0.1)
    assert_close(loss, t(0.618138869))


def test_dpo_ipo_hand():
    pc, pr = t([-10.0, -5.0]), t([-12.0, -5.0])
    rc, rr = t([-11.0, -4.0]), t([-11.0, -6.0])
    # 1/(2*0.1) = 5; h = [2, -2] -> (2-5)^2 = 9, (-2-5)^2 = 49; mean 29
    loss, st = rm.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert_close(loss, t(29.0))
    assert_close(st["margins"], t([0.2, -0.2]))


def test_dpo_bad_type():
    x = t([0.0])
    with pytest.raises(ValueError):
        rm.dpo_loss(x, x, x, x, loss_type="hinge_typo")


def test_bradley_terry_hand():
    c, r = t([2.0, 0.0]), t([1.0, 1.0])
    # diffs [1, -1]: log(1+e^-1) = 0.313261687, log(1+e^1) = 1.313261687 -> mean 0.813261687
    loss, acc = rm.bradley_terry_loss(c, r)
    assert_close(loss, t(0.813261687))
    assert_close(acc, torch.tensor(0.5))
    # margin 1: diffs [0, -2]: log 2 = 0.693147181, log(1+e^2) = 2.126928011 -> 1.410037596
    loss, _ = rm.bradley_terry_loss(c, r, margin=1.0)
    assert_close(loss, t(1.410037596))
    # per-pair margin [1, 0]: diffs [0, -1] -> (0.693147181 + 1.313261687)/2 = 1.003204434
    loss, _ = rm.bradley_terry_loss(c, r, margin=t([1.0, 0.0]))
    assert_close(loss, t(1.003204434))


# ---------------------------------------------------------------------------
# reward-model ensembles
# ---------------------------------------------------------------------------

def test_aggregate_ensemble_hand():
    s = t([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])  # K=3, N=2
    # col0: mean 3, dev -2,0,2 -> var 8/2 = 4 -> std 2; col1: std 0
    mean, std = rm.aggregate_ensemble(s, "mean")
    assert_close(mean, t([3.0, 2.0]))
    assert_close(std, t([2.0, 0.0]))
    assert_close(rm.aggregate_ensemble(s, "wco")[0], t([1.0, 2.0]))
    # uwo lambda 0.5: [3 - 0.5*2, 2 - 0] = [2, 2]
    assert_close(rm.aggregate_ensemble(s, "uwo", uwo_lambda=0.5)[0], t([2.0, 2.0]))


def test_aggregate_ensemble_single_member_and_loop():
    one = t([[1.5, -2.0]])
    for mode in rm.ENSEMBLE_MODES:
        sc, sd = rm.aggregate_ensemble(one, mode)
        assert_close(sc, t([1.5, -2.0]))
        assert_close(sd, t([0.0, 0.0]))
    rng = random.Random(10)
    K, N, lam = 4, 5, 0.7
    s_l = [[rng.gauss(0, 1) for _ in range(N)] for _ in range(K)]
    exp_sc, exp_sd = [], []
    for n in range(N):
        col = [s_l[k][n] for k in range(K)]
        mu = sum(col) / K
        sd = math.sqrt(sum((x - mu) ** 2 for x in col) / (K - 1))
        exp_sc.append(mu - lam * sd)
        exp_sd.append(sd)
    sc, sd = rm.aggregate_ensemble(t(s_l), "uwo", uwo_lambda=lam)
    assert_close(sc, t(exp_sc))
    assert_close(sd, t(exp_sd))


def test_aggregate_ensemble_bad_mode():
    with pytest.raises(ValueError):
        rm.aggregate_ensemble(t([[1.0]]), "max")
