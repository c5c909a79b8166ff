"""Loss assembly of the RL learner: micro-batch weighting reproduces the whole-batch loss,
per-token alignment, batch slicing, LossSpec from the config."""

from __future__ import annotations

import dataclasses
import pickle
import typing

import pytest
import torch

from services.core import rl_math
from services.core.batch_types import TokenBatch, pack_sequences
from services.core.config import AlgorithmConfig, FlywheelConfig
from services.core.learner_batches import PairBatch, PolicyBatch
from services.learner.losses import (
    LossSpec,
    critic_terms,
    dpo_terms,
    micro_weight,
    per_token_logprobs,
    per_token_values,
    policy_terms,
)
from tests.loss_specs import loss_spec

V = 11


def tokens(seed=0, prompt_lens=(2, 3, 1, 4, 2), response_lens=(3, 1, 4, 2, 0)):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(0, V, (n,), generator=g).tolist() for n in response_lens]
    return pack_sequences(prompts, responses, pad_id=0)


def ppo_batch(seed=0):
    tb = tokens(seed)
    g = torch.Generator().manual_seed(seed + 100)
    shape = tb.input_ids.shape
    return PolicyBatch(
        tokens=tb,
        old_logprobs=-torch.rand(shape, generator=g) * 3,
        advantages=torch.randn(shape, generator=g),
        ref_logprobs=-torch.rand(shape, generator=g) * 3,
        returns=torch.randn(shape, generator=g),
        old_values=torch.randn(shape, generator=g),
    )


def logits_for(tb, seed=1):
    return torch.randn(*tb.input_ids.shape, V, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def test_per_token_alignment():
    tb = tokens()
    logits = logits_for(tb)
    lp = per_token_logprobs(logits, tb.input_ids)
    assert lp.shape == tb.input_ids.shape and (lp[:, 0] == 0).all()
    want = torch.log_softmax(logits[1, 2], -1)[tb.input_ids[1, 3]]
    assert lp[1, 3].item() == pytest.approx(want.item())
    scores = torch.arange(10.0).view(2, 5, 1)
    assert per_token_values(scores)[0].tolist() == [0.0, 0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("mode", rl_math.AGG_MODES)
@pytest.mark.parametrize("kind", ["ppo", "sft"])
def test_micro_batches_sum_to_the_whole_batch_loss(mode, kind):
    batch = ppo_batch()
    spec = loss_spec(kind=kind, loss_agg_mode=mode, kl_coef=0.1, entropy_coef=0.01)
    logits = logits_for(batch.tokens)
    whole, stats = policy_terms(logits, batch, spec)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    denominator = batch.loss_count(spec.algorithm.loss_agg_mode)
    total, grad_sum, kl = 0.0, torch.zeros_like(logits), 0.0
    for start in range(0, 5, 2):
        micro = batch.rows(start, start + 2).trim()
        width = micro.tokens.input_ids.shape[1]
        sub = logits[start : start + 2, :width]
        loss, st = policy_terms(sub, micro, spec)
        w = micro_weight(micro, spec, denominator)
        total += w * loss.item()
        kl += w * st["kl"].item()
        (g,) = torch.autograd.grad(loss * w, logits)
        grad_sum += g
    assert total == pytest.approx(whole.item(), rel=1e-5, abs=1e-6)
    assert kl == pytest.approx(stats["kl"].item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_sum, grad_whole, atol=1e-6, rtol=1e-5)


def test_kl_term_ignores_masked_positions():
    batch = ppo_batch()
    batch.ref_logprobs = torch.where(batch.tokens.response_mask.bool(), batch.ref_logprobs, -1e4)
    logits = logits_for(batch.tokens)
    loss, stats = policy_terms(logits, batch, loss_spec(kl_coef=1.0))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all() and torch.isfinite(stats["kl"])


def test_dpo_and_critic_terms():
    chosen, rejected = tokens(1), tokens(2)
    lc, lr = logits_for(chosen, 3), logits_for(rejected, 4)
    pc = rl_math.masked_sum(per_token_logprobs(lc, chosen.input_ids), chosen.response_mask, dim=-1).detach()
    pr = rl_math.masked_sum(per_token_logprobs(lr, rejected.input_ids), rejected.response_mask, dim=-1).detach()
    micro = PairBatch(chosen, rejected, pc, pr)
    loss, stats = dpo_terms(lc, lr, micro, loss_spec("dpo"))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # policy == reference
    assert micro.loss_count(loss_spec("dpo").algorithm.loss_agg_mode) == 5
    batch = ppo_batch()
    scores = torch.zeros(*batch.tokens.input_ids.shape, 1, requires_grad=True)
    loss, stats = critic_terms(scores, batch, loss_spec(vf_coef=0.5, value_clip=None))
    mask = batch.tokens.response_mask
    want = 0.5 * rl_math.masked_mean(0.5 * batch.returns ** 2, mask)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_loss_spec_validation_and_config():
    with pytest.raises(ValueError, match="kind"):
        loss_spec("reinforce")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        loss_spec(loss_agg_mode="sum")
    with pytest.raises(ValueError, match="ptx_coef"):
        loss_spec("dpo", ptx_coef=0.1)  # the ptx term goes with policy-gradient updates
    with pytest.raises(ValueError, match="ptx_coef"):
        loss_spec(ptx_coef=-0.1)
    assert loss_spec(ptx_coef=0.1).algorithm.ptx_coef == 0.1
    cfg = FlywheelConfig()
    cfg.algorithm.name = "grpo"
    cfg.algorithm.kl_coef = 0.02
    cfg.learner.entropy_coef = 0.01
    spec = LossSpec.from_config(cfg, "ppo")
    assert (spec.kind, spec.algorithm.kl_coef, spec.learner.entropy_coef) == ("ppo", 0.02, 0.01)
    cfg = FlywheelConfig.model_validate({"algorithm": {"name": "online_dpo"}})
    spec = LossSpec.from_config(cfg, "dpo")
    assert (spec.kind, spec.algorithm.kl_coef) == ("dpo", 0.0)
    cfg = FlywheelConfig.model_validate({"algorithm": {"name": "ppo", "kl_coef": 0.3, "kl_in_reward": True}})
    assert LossSpec.from_config(cfg, "ppo").algorithm.kl_coef == 0.0  # the KL is in the reward


def test_loss_spec_is_the_config_sections_it_reads():
    """The spec declares no setting of its own: its fields are the loss family, the policy
    loss and copies of the algorithm and learner sections (so later edits of the config do
    not reach it), and it pickles small for the learner actors."""
    assert [f.name for f in dataclasses.fields(LossSpec)] == ["kind", "algorithm", "learner", "policy_loss"]
    cfg = FlywheelConfig.model_validate({"algorithm": {"name": "grpo", "clip_range": 0.1}})
    spec = LossSpec.from_config(cfg, "ppo")
    cfg.algorithm.clip_range = 0.3
    assert spec.algorithm.clip_range == 0.1 and cfg.algorithm.clip_range == 0.3
    data = pickle.dumps(spec)
    assert pickle.loads(data) == spec and len(data) < 4096
    # the config's choices are the ones the loss formulas accept
    alg = AlgorithmConfig.model_fields
    assert typing.get_args(alg["loss_agg_mode"].annotation) == rl_math.AGG_MODES
    assert typing.get_args(alg["kl_estimator"].annotation) == rl_math.KL_KINDS
    assert typing.get_args(alg["dpo_loss"].annotation) == rl_math.DPO_LOSS_TYPES


def test_tis_cap_weights_each_tokens_policy_loss():
    """policy_terms with tis_cap: the clipped surrogate of every token times
    min(exp(old - sampler), cap), computed here token by token."""
    batch = ppo_batch(seed=3)
    g = torch.Generator().manual_seed(7)
    batch.sampler_logprobs = batch.old_logprobs + 0.6 * torch.randn(batch.old_logprobs.shape, generator=g)
    tb = batch.tokens
    logits = logits_for(tb, seed=4)
    spec = loss_spec("ppo", tis_cap=1.5)
    loss, stats = policy_terms(logits, batch, spec)
    lp = per_token_logprobs(logits, tb.input_ids)
    total, count, weights = 0.0, 0, []
    for b in range(tb.size):
        for pos in range(tb.input_ids.shape[1]):
            if tb.response_mask[b, pos] == 0:
                continue
            ratio = torch.exp(lp[b, pos] - batch.old_logprobs[b, pos]).item()
            a = batch.advantages[b, pos].item()
            surrogate = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
            w = min(torch.exp(batch.old_logprobs[b, pos] - batch.sampler_logprobs[b, pos]).item(), 1.5)
            total, count = total + w * surrogate, count + 1
            weights.append(w)
    assert stats["pg_loss"].item() == pytest.approx(total / count, rel=1e-5)
    assert stats["tis_weight_mean"].item() == pytest.approx(sum(weights) / len(weights), rel=1e-5)
    assert min(weights) < 1 and max(weights) == 1.5  # the cap acted and some weights are below 1
    unweighted, _ = policy_terms(logits, batch, loss_spec("ppo"))
    assert abs(unweighted.item() - loss.item()) > 1e-3
    batch.sampler_logprobs = None
    with pytest.raises(ValueError, match="sampler_logprobs"):
        policy_terms(logits, batch, spec)


def test_tis_cap_config():
    with pytest.raises(ValueError, match="tis_cap"):
        loss_spec("dpo", tis_cap=2.0)
    with pytest.raises(ValueError, match="tis_cap"):
        loss_spec(tis_cap=0.0)
    cfg = FlywheelConfig()
    cfg.algorithm.name = "grpo"
    cfg.algorithm.tis_cap = 2.0
    assert LossSpec.from_config(cfg, "ppo").algorithm.tis_cap == 2.0
    assert LossSpec.from_config(FlywheelConfig(), "ppo").algorithm.tis_cap is None


def test_minibatch_bounds_and_update_plan():
    from services.learner.losses import minibatch_bounds, minibatch_count, plan_update

    assert minibatch_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]  # torch.tensor_split's sizes
    assert minibatch_bounds(6, 1) == [(0, 6)]
    assert [minibatch_count(12, m) for m in (None, 12, 5, 4, 1)] == [1, 1, 3, 3, 12]
    # two ranks of 4 rows, minibatches of 4 sequences: 2 per rank, denominators over both ranks
    masks = [[[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 0, 1]], [[0, 1, 1], [0, 1, 1], [0, 0, 0], [0, 1, 0]]]
    shards = []
    for m in masks:
        mask = torch.tensor(m)
        shards.append(PolicyBatch(tokens=TokenBatch(torch.ones_like(mask), torch.ones_like(mask), mask),
                                  ptx=TokenBatch(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long),
                                                 torch.tensor([[0, 1], [1, 1], [0, 0]]))))
    plan = plan_update(shards, loss_spec("ppo", ppo_epochs=3, ppo_minibatch_size=4))
    assert plan.bounds == ((0, 2), (2, 4)) and plan.scale == 2.0 and plan.optimizer_steps == 6
    assert plan.denominators == (3 + 4, 3 + 1)  # response tokens of rows 0-1 / 2-3 on both ranks
    assert plan.ptx_bounds == ((0, 2), (2, 3)) and plan.ptx_denominators == (6.0, 0.0)
    seq = plan_update(shards, loss_spec("ppo", loss_agg_mode="seq-mean-token-mean", ppo_minibatch_size=4))
    assert seq.denominators == (4, 3)  # sequences with a response token (rank 1's row 2 has none)
    with pytest.raises(ValueError, match="raise algorithm.ppo_minibatch_size"):
        plan_update(shards, loss_spec("ppo", ppo_minibatch_size=1))  # 8 minibatches, 4 rows per rank
    with pytest.raises(ValueError, match="'online_dpo' does not use ppo_epochs"):
        loss_spec("dpo", ppo_epochs=2)
