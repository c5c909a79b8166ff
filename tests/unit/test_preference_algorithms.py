"""Online IPO and Nash-MD against a preference model: the soft IPO loss by hand and as IPO's
expected loss over the label, the preference models (Bradley-Terry, a python function, their
checks), the pairing and the batch the learner gets; Nash-MD's mixture weights and
advantages by hand and against the geometric mixture itself (a slow loop)."""

from __future__ import annotations

import math

import pytest
import torch

from services.algorithms import batches
from services.algorithms.base import StepInputs, get_algorithm
from services.algorithms.online_ipo import sample_pairs
from services.core.batch_types import Trajectory
from services.core.config import PreferenceConfig
from services.core.config_loading import load_config
from services.core.errors import UserError
from services.core.rl_math import dpo_loss
from services.core.rl_variants import soft_ipo_loss
from services.driver.preflight import check_rl_settings
from services.learner.losses import LossSpec, dpo_terms
from services.reward.preference import PreferenceModel
from services.reward.scorers import ScorerOutputError


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_soft_ipo_loss_by_hand_and_as_the_expected_ipo_loss():
    # pair 0: h = (-1 - -2) - (-3 - -2.5) = 1.5; p = 0.9, beta 0.5: target (0.4) / 0.5 = 0.8; (1.5 - 0.8)^2 = 0.49
    # pair 1: h = (-2 - -2) - (-1 - -1) = 0;   p = 0.25: target -0.5; (0 + 0.5)^2 = 0.25
    loss, stats = soft_ipo_loss(t([-1.0, -2.0]), t([-3.0, -1.0]), t([-2.0, -2.0]), t([-2.5, -1.0]),
                                t([0.9, 0.25]), beta=0.5)
    assert loss.item() == pytest.approx((0.49 + 0.25) / 2)
    assert stats["margin"].item() == pytest.approx(0.75) and stats["target"].item() == pytest.approx(0.15)
    assert stats["agreement"].item() == 0.5  # pair 0 agrees (h > 0, p > 1/2); pair 1's h = 0 does not
    # IPO's loss with the label drawn (a wins with probability p) = the soft loss + a constant in h:
    # p (h - c)^2 + (1 - p)(h + c)^2 = (h - (2p - 1) c)^2 + c^2 (1 - (2p - 1)^2), c = 1 / (2 beta)
    beta, c = 0.5, 1.0
    for h, p in [(1.5, 0.9), (0.0, 0.25), (-0.7, 0.6)]:
        win, _ = dpo_loss(t([h]), t([0.0]), t([0.0]), t([0.0]), beta=beta, loss_type="ipo")
        lose, _ = dpo_loss(t([0.0]), t([h]), t([0.0]), t([0.0]), beta=beta, loss_type="ipo")
        soft, _ = soft_ipo_loss(t([h]), t([0.0]), t([0.0]), t([0.0]), t([p]), beta)
        expected = p * win.item() + (1 - p) * lose.item()
        assert soft.item() + c * c * (1 - (2 * p - 1) ** 2) == pytest.approx(expected)
    # p = 1 is IPO's hard pair exactly
    hard, _ = dpo_loss(t([0.3]), t([0.1]), t([0.0]), t([0.0]), beta=0.2, loss_type="ipo")
    assert soft_ipo_loss(t([0.3]), t([0.1]), t([0.0]), t([0.0]), t([1.0]), 0.2)[0].item() == pytest.approx(hard.item())


PREFERENCES = '''
def longer(prompts, a, b, **columns):
    return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]

def out_of_range(prompts, a, b, **columns):
    return [1.5 for _ in a]

def raises(prompts, a, b, **columns):
    raise RuntimeError("judge offline")
'''


def test_preference_models(tmp_path):
    bt = PreferenceModel(PreferenceConfig(kind="bt", temperature=0.5))
    # sigmoid((1 - 0) / 0.5) = sigmoid(2) = 0.880797; equal rewards 0.5; a huge gap stays finite
    assert bt.compare(["q"] * 3, ["a"] * 3, ["b"] * 3, {}, [1.0, 0.2, -900.0], [0.0, 0.2, 900.0]) == pytest.approx(
        [1 / (1 + math.exp(-2)), 0.5, 0.0])
    (tmp_path / "pref.py").write_text(PREFERENCES)
    longer = PreferenceModel(PreferenceConfig(kind="python", path=f"{tmp_path / 'pref.py'}:longer"))
    assert longer.compare(["q"] * 3, ["abc", "a", "ab"], ["a", "abc", "cd"], {}, [0] * 3, [0] * 3) == [1.0, 0.0, 0.5]
    bad = PreferenceModel(PreferenceConfig(kind="python", path=f"{tmp_path / 'pref.py'}:out_of_range"))
    with pytest.raises(ScorerOutputError, match=r"reward.preference: pair 0: P\(a preferred to b\) must be a number "
                                                r"in \[0, 1\], got 1.5"):
        bad.compare(["q"], ["a"], ["b"], {}, [0], [0])
    with pytest.raises(Exception, match="reward.preference: the preference function raised RuntimeError: judge offline"):
        PreferenceModel(PreferenceConfig(kind="python", path=f"{tmp_path / 'pref.py'}:raises")).compare(
            ["q"], ["a"], ["b"], {}, [0], [0])
    with pytest.raises(ValueError, match="kind 'python' needs path"):
        PreferenceConfig(kind="python")


def test_a_python_preference_runs_in_a_reward_member_actor(tmp_path):
    """The member actor's body (ScorerActor) without Ray: the function loads there on the first
    call; the driver's side checks what comes back."""
    from services.core.config import ScorerConfig
    from services.reward.ensemble import ScorerActor

    (tmp_path / "pref.py").write_text(PREFERENCES)
    actor = ScorerActor(ScorerConfig(kind="toy_gold"), 0)
    cfg = PreferenceConfig(kind="python", path=f"{tmp_path / 'pref.py'}:longer")
    assert actor.compare(cfg, ["q", "q"], ["abc", "a"], ["a", "abc"]) == [1.0, 0.0]
    assert 'flywheel_requests_total{method="compare",replica="0/toy_gold-0",service="reward"} 1.0' in actor.metrics_text()
    model = PreferenceModel(cfg, remote=actor.compare)
    assert model.fn is None and model.compare(["q"], ["ab"], ["ab"], {}) == [0.5]
    broken = PreferenceModel(cfg, remote=lambda *args: [0.5, 0.5])  # two answers for one pair
    with pytest.raises(ScorerOutputError, match="expected a list of 1 probabilities, got 2"):
        broken.compare(["q"], ["a"], ["b"], {})


def test_settings_are_checked_before_ray(tmp_path):
    check_rl_settings(load_config("ipo-toy", []))
    with pytest.raises(UserError, match=r"reward.preference.path: no python file"):
        check_rl_settings(load_config("ipo-toy", [f"reward.preference={{kind: python, path: '{tmp_path}/no.py:f'}}"]))
    with pytest.raises(UserError, match="reward.preference: grpo does not compare pairs"):
        check_rl_settings(load_config("grpo-toy", ["reward.preference={kind: bt, temperature: 2}"]))
    with pytest.raises(UserError, match="rollout.n_samples: online_ipo needs at least 2 samples"):
        check_rl_settings(load_config("ipo-toy", ["rollout.n_samples=1"]))


def traj(prompt_id, index, response_ids):
    return Trajectory(prompt_id=prompt_id, prompt="p", prompt_ids=[5, 6], response="r" * len(response_ids),
                      response_ids=response_ids, logprobs=[-0.5] * len(response_ids), finish_reason="stop",
                      policy_version=0, sample_index=index)


def test_pairs_and_the_learner_batch():
    assert sample_pairs(8, 4) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert sample_pairs(6, 3) == [(0, 1), (3, 4)]  # an odd last sample stays unpaired
    cfg = load_config("ipo-toy", ["rollout.n_samples=2"])
    trajectories = [traj("a", 0, [7, 8]), traj("a", 1, [9]), traj("b", 0, [7]), traj("b", 1, [8, 9, 10])]
    tokens = batches.build_tokens(trajectories, 0)
    sampler = batches.sampler_logprobs(trajectories, tokens)
    ref = sampler - 0.25
    algorithm = get_algorithm("online_ipo")
    batch, stats = algorithm.make_batch(StepInputs(
        trajectories, [1.0, 0.5, 0.0, 0.0], tokens, ref=ref, old=sampler, sampler=sampler, values=None, pad_id=0,
        cfg=cfg, preference=PreferenceModel(cfg.reward.preference)))
    # bt at temperature 0.5: sigmoid(0.5 / 0.5) = 0.731059 and sigmoid(0) = 0.5
    assert batch.preference.tolist() == pytest.approx([1 / (1 + math.exp(-1)), 0.5])
    assert batch.ref_chosen_logps.tolist() == pytest.approx([-1.5, -0.75])  # 2 tokens x (-0.75); 1 token
    assert batch.ref_rejected_logps.tolist() == pytest.approx([-0.75, -2.25])
    assert stats["train/pairs"] == 2 and stats["reward/preference_mean"] == pytest.approx((0.731059 + 0.5) / 2, abs=1e-6)
    assert batch.take(torch.tensor([1])).preference.tolist() == [0.5]
    # the learner's loss on it is the soft IPO loss: with logits making the policy equal the reference, h = 0
    spec = LossSpec.from_config(cfg, "dpo")
    vocab = 12
    chosen_logits = torch.zeros(2, batch.chosen.input_ids.shape[1], vocab)
    rejected_logits = torch.zeros(2, batch.rejected.input_ids.shape[1], vocab)
    loss, logged = dpo_terms(chosen_logits, rejected_logits, batch, spec)
    # uniform logits: log p = -log 12 per token; h = (2 - 1) x (-log 12) - (-1.5 + 0.75) for pair 0 ...
    lp = -math.log(vocab)
    h = [(2 * lp + 1.5) - (lp + 0.75), (lp + 0.75) - (3 * lp + 2.25)]
    target = [(1 / (1 + math.exp(-1)) - 0.5) / 0.1, 0.0]
    assert loss.item() == pytest.approx(sum((x - y) ** 2 for x, y in zip(h, target)) / 2, rel=1e-5)
    assert set(logged) >= {"ipo_loss", "ipo_margin", "ipo_target", "ipo_agreement"}


# ---------------------------------------------------------------------------- Nash-MD

def test_nash_md_mixture_weights_and_advantages_by_hand():
    from services.core.rl_variants import mixture_weights, nash_md_advantages

    # log weights beta * (ref - pi) = 0.5 * ([-1, -2, -3] - -1.5) = 0.25, -0.25, -0.75 for opponents 0, 1, 2
    ref, pi = t([[-1.0, -2.0, -3.0]]), t([[-1.5, -1.5, -1.5]])
    w = mixture_weights(ref, pi, 0.5)[0]
    s = 1 / (1 + math.exp(-0.5))  # e^-0.25 / (e^-0.25 + e^-0.75)
    r = 1 / (1 + math.exp(-1.0))  # e^0.25 / (e^0.25 + e^-0.75)
    torch.testing.assert_close(w, t([[0, s, 1 - s], [r, 0, 1 - r], [s, 1 - s, 0]]))
    # P(0 > 1) = 0.8, P(0 > 2) = 0.6, P(1 > 2) = 0.3 and the complements
    p = t([[[0.5, 0.8, 0.6], [0.2, 0.5, 0.3], [0.4, 0.7, 0.5]]])
    advantages, _ = nash_md_advantages(p, ref, pi, 0.5)
    expected = [s * 0.8 + (1 - s) * 0.6 - 0.5, r * 0.2 + (1 - r) * 0.3 - 0.5, s * 0.4 + (1 - s) * 0.7 - 0.5]
    torch.testing.assert_close(advantages[0], t(expected))
    assert advantages[0].tolist() == pytest.approx([0.224492, -0.273106, 0.013262], abs=1e-6)
    uniform = mixture_weights(ref, pi, 0.0)[0]  # beta 0: the opponent is the policy itself, every other sample alike
    torch.testing.assert_close(uniform, t([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]))


def test_the_weighted_opponents_follow_the_geometric_mixture():
    """A slow loop: many samples of pi over 3 outcomes, weighted as opponents of sample 0, put
    their weight where pi^(1-beta) * ref^beta / Z does."""
    import random

    from services.core.rl_variants import mixture_weights

    pi, ref, beta = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], 0.5
    rng = random.Random(0)
    draws = [0] + rng.choices(range(3), weights=pi, k=20000)
    w = mixture_weights(t([[math.log(ref[k]) for k in draws]]), t([[math.log(pi[k]) for k in draws]]), beta)[0, 0]
    mass = [0.0, 0.0, 0.0]
    for k, weight in zip(draws, w.tolist()):
        mass[k] += weight
    target = [pi[k] ** (1 - beta) * ref[k] ** beta for k in range(3)]
    assert mass == pytest.approx([x / sum(target) for x in target], abs=0.01)


def test_nash_md_batch_asks_both_ways_and_averages(tmp_path):
    (tmp_path / "pref.py").write_text('''
def first_wins(prompts, a, b, **columns):
    return [0.7 for _ in a]  # a model that favours the first position only

def longer(prompts, a, b, **columns):
    return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]
''')
    cfg = load_config("nash-toy", ["rollout.n_samples=2", "algorithm.mixture_coef=0.25"])
    assert cfg.algorithm.loss_agg_mode == "seq-mean-token-sum"  # the published REINFORCE form
    trajectories = [traj("a", 0, [7, 8]), traj("a", 1, [9]), traj("b", 0, [7]), traj("b", 1, [8, 9, 10])]
    tokens = batches.build_tokens(trajectories, 0)
    sampler = batches.sampler_logprobs(trajectories, tokens)
    algorithm = get_algorithm("nash_md")

    def step(fn):
        model = PreferenceModel(PreferenceConfig(kind="python", path=f"{tmp_path / 'pref.py'}:{fn}"))
        return algorithm.make_batch(StepInputs(trajectories, [0.0] * 4, tokens, ref=sampler - 0.1, old=sampler,
                                               sampler=sampler, values=None, pad_id=0, cfg=cfg, preference=model))

    biased, stats = step("first_wins")
    assert biased.advantages.abs().max() == 0 and stats["reward/preference_vs_mixture"] == 0.5  # 0.7 and 1 - 0.7
    longer, stats = step("longer")
    # n = 2: the only opponent is the other sample; the longer one wins: A = +1/2, the shorter -1/2
    mask = longer.tokens.response_mask.bool()
    torch.testing.assert_close(longer.advantages, t([0.5, -0.5, -0.5, 0.5]).float()[:, None] * mask)
    assert stats["nash/opponent_ess_mean"] == 1.0
