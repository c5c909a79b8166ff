"""The RL learner with real DeepSpeed on CPU: log-probs as transformers computes them, PPO /
DPO / SFT steps, the critic, ZeRO-3 export, checkpoint continuity, and a 2-rank Ray group
that makes the same update as one rank."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.core.batch_types import pack_sequences
from services.core.config import LearnerConfig, Resources
from services.core.errors import UserError
from services.core.learner_batches import PairBatch, PolicyBatch
from services.learner.policy_learner import PolicyLearner
from tests.conftest import save_tiny_llama
from tests.loss_specs import loss_spec

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]
LR = 1e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = ["list 3 fruits: apple pear fig", "12+7=19", "hello world"] * 30
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), texts, vocab_size=320, seed=3,
                           num_layers=2, intermediate_size=128)


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_tokens(prompt_lens, response_lens, seed=0, vocab=256, pad_id=1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in response_lens]
    return pack_sequences(prompts, responses, pad_id)


def ppo_batch(learner, tokens, seed=1, ref_shift=0.0):
    """old = current log-probs, random advantages; returns/old_values for the critic."""
    g = torch.Generator().manual_seed(seed)
    old = learner.logprobs(tokens)
    batch = PolicyBatch(
        tokens=tokens,
        old_logprobs=old,
        advantages=torch.randn(tokens.input_ids.shape, generator=g),
        ref_logprobs=old + ref_shift,
        returns=torch.randn(tokens.input_ids.shape, generator=g),
    )
    if getattr(learner, "critic_engine", True) is not None:
        batch.old_values = learner.values(tokens)
    return batch


def direct(model, tokens):
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, tokens.input_ids[:, 1:, None]).squeeze(-1)
    p = torch.softmax(logits, -1)
    entropy = -(p * torch.log_softmax(logits, -1)).sum(-1)
    return logp, entropy


def config(**overrides) -> LearnerConfig:
    return LearnerConfig(**{"lr": LR, "warmup_steps": 0, "micro_batch_size": 2, **overrides})


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_logprobs_entropy_values_match_transformers(model_dir):
    learner = PolicyLearner(str(model_dir), config(critic=True, micro_batch_size=3))
    tokens = make_tokens([3, 5, 2, 4, 6], [4, 1, 6, 3, 2])
    logp, entropy = direct(hf_model(model_dir), tokens)
    valid = tokens.attention_mask[:, 1:].bool()
    ours = learner.logprobs(tokens)
    assert ours.shape == tokens.input_ids.shape
    torch.testing.assert_close(ours[:, 1:][valid], logp[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(learner.entropy(tokens)[:, 1:][valid], entropy[valid], atol=1e-5, rtol=1e-5)
    assert (ours[:, 0] == 0).all() and (ours[:, 1:][~valid] == 0).all()
    values = learner.values(tokens)  # zero-initialised value head
    assert values.shape == tokens.input_ids.shape and torch.isfinite(values).all()


def test_ppo_step_moves_policy_and_critic(model_dir):
    learner = PolicyLearner(str(model_dir), config(critic=True))
    tokens = make_tokens([3, 5, 2, 4], [4, 2, 6, 3])
    before, values_before = learner.export_weights(), learner.values(tokens)
    batch = ppo_batch(learner, tokens, ref_shift=-0.1)
    metrics = learner.train_step(batch, loss_spec("ppo", kl_coef=0.1, entropy_coef=0.01))
    assert metrics["policy_version"] == learner.policy_version == 1
    for key in ("train/loss", "train/pg_loss", "train/kl", "train/clip_frac", "train/entropy",
                "train/grad_norm", "train/lr", "train/value_loss", "train/critic_grad_norm"):
        assert key in metrics and metrics[key] == metrics[key], key  # present, not NaN
    assert metrics["train/lr"] == pytest.approx(LR)
    assert metrics["train/kl"] > 0  # ref_logprobs were shifted away from the policy
    after = learner.export_weights()
    assert set(after) == set(before) and "lm_head.weight" not in after  # tied, as in safetensors
    assert max_diff(after, before) > 1e-4
    assert (learner.logprobs(tokens) - batch.old_logprobs).abs().max() > 1e-4
    assert (learner.values(tokens) - values_before).abs().max() > 1e-4
    assert 'flywheel_policy_version{replica="0",service="learner"} 1.0' in learner.metrics_text()


def test_dpo_and_sft_steps(model_dir):
    learner = PolicyLearner(str(model_dir), config())
    chosen, rejected = make_tokens([3, 4, 2], [3, 2, 4], seed=5), make_tokens([3, 4, 2], [5, 1, 2], seed=6)
    ref_c = (learner.logprobs(chosen) * chosen.response_mask).sum(-1)
    ref_r = (learner.logprobs(rejected) * rejected.response_mask).sum(-1)
    batch = PairBatch(chosen, rejected, ref_c, ref_r)
    metrics = learner.train_step(batch, loss_spec("dpo", dpo_beta=0.5))
    assert metrics["train/loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)  # at pi = ref
    assert metrics["train/dpo_acc"] == 0.0
    margin = ((learner.logprobs(chosen) * chosen.response_mask).sum(-1) - ref_c) - (
        (learner.logprobs(rejected) * rejected.response_mask).sum(-1) - ref_r
    )
    assert (margin > 0).all()  # one step already prefers the chosen responses
    sft = PolicyBatch(tokens=chosen)
    first = learner.train_step(sft, loss_spec("sft"))["train/loss"]
    assert learner.train_step(sft, loss_spec("sft"))["train/loss"] < first
    assert learner.policy_version == 3


def test_zero3_logprobs_and_export(model_dir):
    from safetensors.torch import load_file

    learner = PolicyLearner(str(model_dir), config(zero_stage=3, critic=True))
    tokens = make_tokens([3, 5, 2], [4, 2, 3])
    logp, _ = direct(hf_model(model_dir), tokens)
    valid = tokens.attention_mask[:, 1:].bool()
    torch.testing.assert_close(learner.logprobs(tokens)[:, 1:][valid], logp[valid], atol=1e-5, rtol=0)
    saved = load_file(str(model_dir / "model.safetensors"))
    exported = learner.export_weights()
    assert set(exported) == set(saved)
    for name, tensor in saved.items():
        assert exported[name].shape == tensor.shape and exported[name].dtype == torch.float32
        assert exported[name].is_contiguous()
    assert max_diff(exported, saved) == 0.0
    learner.train_step(ppo_batch(learner, tokens), loss_spec("ppo"))
    assert learner.values(tokens).shape == tokens.input_ids.shape
    trained = learner.export_weights()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in saved.items()}
    assert max_diff(trained, saved) > 1e-4


def test_checkpoint_continuity(model_dir, tmp_path):
    learner = PolicyLearner(str(model_dir), config(zero_stage=2, critic=True))
    tokens = make_tokens([3, 5, 2, 4], [4, 2, 6, 3])
    spec = loss_spec("ppo", kl_coef=0.05)
    learner.train_step(ppo_batch(learner, tokens, seed=1), spec)  # non-trivial optimizer state
    learner.save_checkpoint(tmp_path / "ckpt")
    batch = ppo_batch(learner, tokens, seed=2)
    metrics_a = learner.train_step(batch, spec)
    weights_a, values_a = learner.export_weights(), learner.values(tokens)
    assert learner.load_checkpoint(tmp_path / "ckpt") == 1
    metrics_b = learner.train_step(batch, spec)
    assert metrics_b == pytest.approx(metrics_a, rel=1e-6, abs=1e-7)
    assert metrics_b["policy_version"] == 2
    assert max_diff(learner.export_weights(), weights_a) < 1e-7
    torch.testing.assert_close(learner.values(tokens), values_a, atol=1e-7, rtol=0)
    with pytest.raises(UserError, match="no learner checkpoint"):
        learner.load_checkpoint(tmp_path / "missing")


def test_fp16_on_cpu_is_a_user_error(model_dir):
    with pytest.raises(UserError, match="fp16 is not supported by DeepSpeed on CPU"):
        PolicyLearner(str(model_dir), config(), dtype="fp16")


def test_two_ranks_make_the_same_update_as_one(model_dir, ray_session):
    from services.learner.group import LearnerGroup

    # Adam's first step is lr * g / (|g| + eps): on the odd weight whose gradient is ~0, float
    # summation noise (different reduction order) is amplified to a sizeable fraction of lr,
    # so the tolerance is checked at a small lr (at 1e-3 one weight of 16k differs by 1.3e-5)
    free, lr = Resources(num_cpus=0), 1e-4
    two = LearnerGroup(str(model_dir), config(num_ranks=2, zero_stage=2, critic=True, resources=free, lr=lr))
    one = LearnerGroup(str(model_dir), config(num_ranks=1, zero_stage=0, critic=True, micro_batch_size=8,
                                              resources=free, lr=lr))
    try:
        odd = make_tokens([3, 5, 2, 4, 6], [4, 2, 6, 3, 1], seed=9)  # 5 rows over 2 ranks: padded
        torch.testing.assert_close(two.logprobs(odd), one.logprobs(odd), atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="divisible"):
            two.train_step(PolicyBatch(tokens=odd, old_logprobs=odd.response_mask, advantages=odd.response_mask),
                           loss_spec())
        spec = loss_spec("ppo", kl_coef=0.1, entropy_coef=0.01)
        # equal lengths, then unequal lengths (the global token-mean is kept either way)
        equal = make_tokens([4] * 8, [5] * 8, seed=7)
        unequal = make_tokens([2, 6, 3, 5, 4, 2, 7, 3], [6, 1, 5, 2, 3, 7, 2, 4], seed=8)
        for tokens in (equal, unequal):
            batch, before = ppo_batch(one, tokens), one.export_weights()
            m2, m1 = two.train_step(batch, spec), one.train_step(batch, spec)
            after = one.export_weights()
            assert max_diff(after, before) > 5e-5  # the step moved the weights (by ~lr)
            # per-rank token-means averaged over ranks would differ here by ~2e-4
            assert max_diff(two.export_weights(), after) < 1e-5
            torch.testing.assert_close(two.values(tokens), one.values(tokens), atol=1e-5, rtol=0)
            for key in ("train/loss", "train/pg_loss", "train/kl", "train/entropy", "train/value_loss",
                        "train/grad_norm"):
                assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
        # PPO-ptx: the SFT rows are split over the ranks on their own and normalised by the
        # global token count, so 2 ranks still make the 1-rank update
        ptx_spec = loss_spec("ppo", kl_coef=0.1, entropy_coef=0.01, ptx_coef=0.5)
        batch = dataclasses.replace(ppo_batch(one, unequal), ptx=make_tokens([2, 5, 3, 4, 2, 6], [5, 1, 4, 2, 6, 3], seed=10))
        m2, m1 = two.train_step(batch, ptx_spec), one.train_step(batch, ptx_spec)
        assert max_diff(two.export_weights(), one.export_weights()) < 1e-5
        assert m2["train/ptx_nll"] == pytest.approx(m1["train/ptx_nll"], rel=1e-4)
        # PPO minibatches and epochs: the ranks cut their shards alike and normalise by the
        # global minibatch's token count, so 2 ranks still make the 1-rank update
        mini_spec = loss_spec("ppo", kl_coef=0.1, ppo_epochs=2, ppo_minibatch_size=4)
        batch = ppo_batch(one, unequal)
        m2, m1 = two.train_step(batch, mini_spec), one.train_step(batch, mini_spec)
        assert m2["train/optimizer_steps"] == m1["train/optimizer_steps"] == 4
        assert max_diff(two.export_weights(), one.export_weights()) < 1e-5
        assert m2["train/pg_loss"] == pytest.approx(m1["train/pg_loss"], rel=1e-4, abs=1e-6)
        assert m2["policy_version"] == two.policy_version == 4
        text = two.metrics_text()
        for rank in (0, 1):
            assert f'flywheel_policy_version{{replica="{rank}",service="learner"}} 4.0' in text
    finally:
        two.shutdown()
        one.shutdown()


def test_ppo_minibatches_and_epochs(model_dir):
    """One minibatch of the whole batch is exactly the default update; two minibatches are
    exactly two optimizer steps on the halves (old log-probs and advantages fixed) and the
    second one clips; a second epoch over one minibatch clips too."""
    tokens = make_tokens([3, 5, 2, 4, 3, 6], [4, 2, 6, 3, 5, 2], seed=4)
    settings = {"clip_range": 0.05, "kl_coef": 0.1}
    spec = loss_spec("ppo", **settings)
    fast = config(lr=2e-2, critic=True)
    default, whole = PolicyLearner(str(model_dir), fast), PolicyLearner(str(model_dir), fast)
    batch = ppo_batch(default, tokens, ref_shift=-0.1)
    m_default = default.train_step(batch, spec)
    m_whole = whole.train_step(batch, loss_spec("ppo", **settings, ppo_minibatch_size=6))
    assert m_whole == m_default and m_default["train/clip_frac"] == 0.0  # on-policy: the ratio is 1
    assert max_diff(whole.export_weights(), default.export_weights()) == 0.0

    halves, stepwise = PolicyLearner(str(model_dir), fast), PolicyLearner(str(model_dir), fast)
    m_halves = halves.train_step(batch, loss_spec("ppo", **settings, ppo_minibatch_size=3))
    first = stepwise.train_step(batch.rows(0, 3), spec)
    second = stepwise.train_step(batch.rows(3, 6), spec)
    assert max_diff(halves.export_weights(), stepwise.export_weights()) < 1e-7
    assert m_halves["train/optimizer_steps"] == 2 and halves.policy_version == 1
    assert first["train/clip_frac"] == 0.0 < second["train/clip_frac"]
    assert m_halves["train/clip_frac"] == pytest.approx((first["train/clip_frac"] + second["train/clip_frac"]) / 2)
    assert m_halves["train/pg_loss"] == pytest.approx((first["train/pg_loss"] + second["train/pg_loss"]) / 2)

    epochs = PolicyLearner(str(model_dir), fast)
    m_epochs = epochs.train_step(batch, loss_spec("ppo", **settings, ppo_epochs=2))
    assert m_epochs["train/optimizer_steps"] == 2 and m_epochs["train/clip_frac"] > 0
    assert m_epochs["train/value_clip_frac"] > 0  # the critic's second pass clips against old_values


def test_ptx_term_with_zero_advantages_is_an_sft_step(model_dir):
    """PPO-ptx: with zero advantages and no KL the policy-gradient part has no gradient, so
    one ppo step with ptx_coef 1 on SFT rows equals one SFT step on those rows."""
    ptx_rows = make_tokens([3, 2, 4, 3, 5], [3, 4, 2, 2, 3], seed=9)
    mixed = PolicyLearner(str(model_dir), config())
    plain = PolicyLearner(str(model_dir), config())
    tokens = make_tokens([3, 5, 2, 4], [4, 2, 6, 3])
    batch = PolicyBatch(tokens=tokens, old_logprobs=mixed.logprobs(tokens), advantages=torch.zeros(tokens.input_ids.shape),
                        ptx=ptx_rows)
    m = mixed.train_step(batch, loss_spec("ppo", ptx_coef=1.0))
    s = plain.train_step(PolicyBatch(tokens=ptx_rows), loss_spec("sft"))
    assert m["train/ptx_nll"] == pytest.approx(s["train/nll"], rel=1e-5)
    assert max_diff(mixed.export_weights(), plain.export_weights()) < 1e-6
    # and with ptx_coef 0 the rows are ignored
    again = PolicyLearner(str(model_dir), config())
    before = again.export_weights()
    again.train_step(dataclasses.replace(batch, old_logprobs=again.logprobs(tokens)), loss_spec("ppo"))
    assert max_diff(again.export_weights(), before) < 1e-7


def test_response_hidden_sums_match_transformers(model_dir):
    learner = PolicyLearner(str(model_dir), config(micro_batch_size=2))
    tokens = make_tokens([3, 5, 2], [4, 1, 3])
    with torch.no_grad():
        hidden = hf_model(model_dir)(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                     output_hidden_states=True).hidden_states[-1]
    expected = torch.stack([
        sum(hidden[b, t - 1] for t in range(1, tokens.input_ids.shape[1]) if tokens.response_mask[b, t])
        for b in range(3)
    ])
    torch.testing.assert_close(learner.response_hidden_sums(tokens), expected, atol=1e-4, rtol=1e-4)
