"""Sequence packing (``learner.packing``, ``reference.packing``) against the padded path, with
real DeepSpeed on CPU (gloo, fp32): transformers' block-diagonal mask from restarting
position ids, the same per-token log-probs, entropy, values and hidden sums, the same PPO /
GRPO / DPO / PPO-ptx update (loss metrics and weights), and the same reference log-probs.

The batch is long-tailed so that packed micro-batches hold different numbers of rows (the
gradient-accumulation weights must still add up to the whole batch's loss)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.core.batch_types import pack_sequences, response_values
from services.core.config import ReferenceConfig
from services.core.learner_batches import PairBatch, PolicyBatch
from services.core.packing import pack_bins, pack_row
from services.learner.policy_learner import PolicyLearner
from services.reference.server import ReferenceServer
from tests.integration.test_learner import config, make_tokens, max_diff, model_dir, ppo_batch  # noqa: F401 (fixture)
from tests.loss_specs import loss_spec

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPTS, RESPONSES = [3, 5, 2, 4, 6, 3], [4, 2, 12, 3, 1, 8]  # lengths 7 7 14 7 7 11
BUDGET = 16  # first-fit decreasing: [2] [5] [0, 1] [3, 4] -> rows per micro-batch 2, 1, 2, 1
LR = 1e-4  # see test_two_ranks_make_the_same_update_as_one: Adam's first step amplifies noise


# under the seq-mean modes the diagnostics clip_frac, approx_kl, ratio_mean are token-means
# within each micro-batch weighted by its sequence count, so they depend on how the batch is
# cut (micro_batch_size 2 vs 3 differ too); the loss terms and the update do not
LOSS_METRICS = ("train/loss", "train/pg_loss", "train/kl", "train/entropy", "train/grad_norm", "train/lr",
                "policy_version")


def packed(**overrides):
    return config(packing=True, max_tokens_per_micro_batch=BUDGET, **overrides)


def test_the_long_tailed_batch_makes_uneven_bins():
    lengths = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    assert pack_bins(lengths, BUDGET) == [[0, 1], [2], [3, 4], [5]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_restarting_position_ids_make_a_block_diagonal_mask(attn):
    """transformers 5.19 (masking_utils.find_packed_sequence_indices): with position_ids, no
    attention mask and no KV cache, Llama and Qwen2 (causal LM and the critic's token
    classifier) attend within each packed sequence only; with the config's default
    use_cache=True a cache is made and the mask is plainly causal over the whole row."""
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification, Qwen2Config,
                              Qwen2ForCausalLM)

    tokens = make_tokens(PROMPTS, RESPONSES, vocab=128)
    row = pack_row(tokens.input_ids, tokens.attention_mask)
    valid = tokens.attention_mask.bool()
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, attn_implementation=attn)
    torch.manual_seed(0)
    for model in (LlamaForCausalLM(LlamaConfig(**shape)), Qwen2ForCausalLM(Qwen2Config(**shape)),
                  LlamaForTokenClassification(LlamaConfig(num_labels=1, **shape))):
        model.eval()
        with torch.no_grad():
            padded = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
            ours = model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False).logits
            cached = model(input_ids=row.input_ids, position_ids=row.position_ids).logits
        assert (row.unpack(ours, shifted=False)[valid] - padded[valid]).abs().max() < 1e-5, type(model).__name__
        assert (row.unpack(cached, shifted=False)[valid] - padded[valid]).abs().max() > 1e-2  # the trap


def test_per_token_outputs_equal_padded(model_dir):
    tokens = make_tokens(PROMPTS, RESPONSES, seed=2)
    padded, ours = PolicyLearner(str(model_dir), config(critic=True)), PolicyLearner(str(model_dir), packed(critic=True))
    for method in ("logprobs", "entropy", "values"):
        want, got = getattr(padded, method)(tokens), getattr(ours, method)(tokens)
        assert got.shape == want.shape == tokens.input_ids.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=method)
    assert (ours.logprobs(tokens)[~tokens.attention_mask.bool()] == 0).all()
    torch.testing.assert_close(ours.response_hidden_sums(tokens), padded.response_hidden_sums(tokens),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_packed_ppo_step_equals_padded(model_dir, agg_mode):
    """Same metrics and the same updated policy (and critic, token-mean) as right-padded
    micro-batches of 2 rows, two train steps in a row (the second one off-policy)."""
    critic = agg_mode == "token-mean"
    padded = PolicyLearner(str(model_dir), config(critic=critic, lr=LR))
    ours = PolicyLearner(str(model_dir), packed(critic=critic, lr=LR))
    tokens = make_tokens(PROMPTS, RESPONSES, seed=3)
    spec = loss_spec("ppo", kl_coef=0.1, entropy_coef=0.01, loss_agg_mode=agg_mode)
    batch = ppo_batch(padded, tokens, ref_shift=-0.1)
    if not critic:
        batch = dataclasses.replace(batch, returns=None, old_values=None)
    before = padded.export_weights()
    for _ in range(2):
        want, got = padded.train_step(batch, spec), ours.train_step(batch, spec)
        assert set(got) == set(want)
        for key in want if critic else LOSS_METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert max_diff(padded.export_weights(), before) > 5e-5  # the steps moved the weights
    assert max_diff(ours.export_weights(), padded.export_weights()) < 1e-5
    torch.testing.assert_close(ours.logprobs(tokens), padded.logprobs(tokens), atol=1e-5, rtol=0)
    if critic:
        torch.testing.assert_close(ours.values(tokens), padded.values(tokens), atol=1e-5, rtol=0)


def test_packed_grpo_minibatches_ptx_and_dpo_equal_padded(model_dir):
    padded, ours = PolicyLearner(str(model_dir), config(lr=LR)), PolicyLearner(str(model_dir), packed(lr=LR))
    tokens = make_tokens(PROMPTS, RESPONSES, seed=4)
    # GRPO's loss family, two minibatches and a PPO-ptx term on long-tailed SFT rows
    spec = loss_spec("ppo", kl_coef=0.05, ppo_minibatch_size=3, ptx_coef=0.5)
    batch = dataclasses.replace(ppo_batch(padded, tokens), returns=None, old_values=None,
                                ptx=make_tokens([2, 6, 3, 2], [9, 1, 2, 5], seed=5))
    want, got = padded.train_step(batch, spec), ours.train_step(batch, spec)
    assert got["train/optimizer_steps"] == 2
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert max_diff(ours.export_weights(), padded.export_weights()) < 1e-5
    # DPO: a pair's budget counts both of its sequences
    chosen, rejected = make_tokens([3, 4, 2, 5], [3, 9, 4, 1], seed=6), make_tokens([3, 4, 2, 5], [5, 1, 2, 8], seed=7)
    ref_c = (padded.logprobs(chosen) * chosen.response_mask).sum(-1)
    ref_r = (padded.logprobs(rejected) * rejected.response_mask).sum(-1) + 0.1
    pairs = PairBatch(chosen, rejected, ref_c, ref_r)
    want, got = padded.train_step(pairs, loss_spec("dpo", dpo_beta=0.5)), ours.train_step(pairs, loss_spec("dpo", dpo_beta=0.5))
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert max_diff(ours.export_weights(), padded.export_weights()) < 1e-5
    sft = PolicyBatch(tokens=tokens)
    want, got = padded.train_step(sft, loss_spec("sft")), ours.train_step(sft, loss_spec("sft"))
    assert got["train/nll"] == pytest.approx(want["train/nll"], rel=1e-5)
    assert max_diff(ours.export_weights(), padded.export_weights()) < 1e-5


def test_packed_sequence_level_loss_with_tis_equals_padded(model_dir):
    """GSPO's sequence-level ratio (a mean over each row's tokens) and truncated IS weights
    against sampler log-probs: row-wise quantities come out the same from packed rows."""
    import services.algorithms.gspo  # noqa: F401 (registers the gspo policy loss)

    padded, ours = PolicyLearner(str(model_dir), config(lr=LR)), PolicyLearner(str(model_dir), packed(lr=LR))
    tokens = make_tokens(PROMPTS, RESPONSES, seed=8)
    batch = dataclasses.replace(ppo_batch(padded, tokens), returns=None, old_values=None)
    noise = torch.randn(tokens.input_ids.shape, generator=torch.Generator().manual_seed(9))
    batch.sampler_logprobs = batch.old_logprobs + 0.05 * noise * tokens.response_mask
    spec = dataclasses.replace(loss_spec("ppo", kl_coef=0.05, tis_cap=2.0), policy_loss="gspo")
    for _ in range(2):
        want, got = padded.train_step(batch, spec), ours.train_step(batch, spec)
        # GSPO's clip_frac is a share of sequences weighted by token counts: it depends on the cut
        for key in (*LOSS_METRICS, "train/tis_weight_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert max_diff(ours.export_weights(), padded.export_weights()) < 1e-5


def test_packed_reference_equals_padded(model_dir):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in [3, 7, 2, 5, 4, 6, 1]]
    responses = [torch.randint(2, 256, (n,), generator=g).tolist() for n in [5, 1, 30, 3, 2, 4, 6]]
    padded = ReferenceServer(str(model_dir), ReferenceConfig(micro_batch_size=3))
    ours = ReferenceServer(str(model_dir), ReferenceConfig(packing=True, max_tokens_per_micro_batch=20))
    want, got = padded.logprobs(prompts, responses), ours.logprobs(prompts, responses)
    assert [len(row) for row in got] == [len(r) for r in responses]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    # and the packed learner's log-probs of the same rows at step 0
    learner = PolicyLearner(str(model_dir), packed())
    tokens = pack_sequences(prompts, responses, pad_id=1)
    for a, b in zip(got, response_values(learner.logprobs(tokens), tokens)):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert ours.logprobs([], []) == []


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_packed_ranks_make_the_one_rank_padded_update(model_dir, ray_session, zero_stage):
    """Rank 0's shard packs into 3 micro-batches, rank 1's into 1: the ranks agree on 3 (an
    all-reduce of the count), since ZeRO-2 reduces gradients in every backward and ZeRO-3
    gathers weights in every forward. The update is the one padded rank's."""
    from services.core.config import Resources
    from services.learner.group import LearnerGroup

    free = Resources(num_cpus=0)
    two = LearnerGroup(str(model_dir), packed(num_ranks=2, zero_stage=zero_stage, resources=free, lr=LR,
                                              step_timeout_s=120))
    one = LearnerGroup(str(model_dir), config(num_ranks=1, resources=free, lr=LR))
    try:
        tokens = make_tokens([4, 3, 2, 1, 2, 2, 2, 2], [10, 10, 10, 2, 2, 2, 2, 2], seed=11)  # 14 13 12 3 | 4 4 4 4
        assert len(pack_bins([14, 13, 12, 3], BUDGET)) == 3 and len(pack_bins([4] * 4, BUDGET)) == 1
        torch.testing.assert_close(two.logprobs(tokens), one.logprobs(tokens), atol=1e-5, rtol=0)
        old = one.logprobs(tokens)
        advantages = torch.randn(tokens.input_ids.shape, generator=torch.Generator().manual_seed(12))
        batch = PolicyBatch(tokens=tokens, old_logprobs=old, advantages=advantages, ref_logprobs=old - 0.1)
        spec = loss_spec("ppo", kl_coef=0.1, entropy_coef=0.01)
        m2, m1 = two.train_step(batch, spec), one.train_step(batch, spec)
        assert max_diff(two.export_weights(), one.export_weights()) < 1e-5
        for key in ("train/loss", "train/pg_loss", "train/kl", "train/entropy", "train/grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    finally:
        two.shutdown()
        one.shutdown()


class InProcess:
    """What the driver asks of every service, for a real service held in this process."""

    def count_quiet_restarts(self) -> int:
        return 0

    def metrics_texts(self) -> list[str]:
        return [self.metrics_text()]

    def shutdown(self) -> None:
        pass


class InProcessLearner(InProcess, PolicyLearner):
    """The real learner, one rank without Ray."""

    def publish_weights(self):
        return {"version": torch.tensor([float(self.policy_version)])}  # what FakeRollout checks


class InProcessReference(InProcess, ReferenceServer):
    pass


def test_driver_loop_with_packing_equals_padded(model_dir, tmp_path):
    """Two GRPO steps of the driver's loop with the real learner and reference (rollout and
    reward: the in-process fakes of tests/fakes.py), packed and padded: the same metrics."""
    from services.core.config_loading import load_config
    from services.driver.driver import Driver
    from services.driver.wiring import Services
    from tests.fakes import FakeReward, FakeRollout

    def make(cfg, policy_dir, needs_critic, optimizer_steps):
        learner = InProcessLearner(str(policy_dir), cfg.learner, total_steps=optimizer_steps)
        reference = InProcessReference(str(policy_dir), cfg.reference)
        rollout = FakeRollout(cfg.rollout.n_samples)
        services = Services(learner, reference, FakeReward(), rollout, pad_id=1)
        services.started = [learner, reference, services.reward, rollout]
        make.made = services
        return services

    runs = {}
    for name, settings in (("padded", ["learner.micro_batch_size=3"]),
                           ("packed", ["learner.packing=true", "learner.max_tokens_per_micro_batch=24",
                                       "reference.packing=true", "reference.max_tokens_per_micro_batch=24"])):
        cfg = load_config("grpo-toy", [f"model.path={model_dir}", "rollout.prompts_per_step=4", "data.toy_size=8",
                                       "rollout.n_samples=2", "algorithm.total_steps=2", "learner.lr=1e-4",
                                       "learner.warmup_steps=0", "rollout.logprob_gap_every=0", *settings])
        driver = Driver(cfg, tmp_path / name, str(model_dir))
        driver.build(make)
        try:
            runs[name] = driver.run(progress=False)
        finally:
            driver.shutdown()
        runs[name + "-weights"] = make.made.learner.export_weights()
    assert [r["step"] for r in runs["packed"]] == [1, 2]
    for want, got in zip(runs["padded"], runs["packed"]):
        for key in ("train/loss", "train/pg_loss", "train/kl", "train/entropy", "train/grad_norm", "reward/mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert max_diff(runs["packed-weights"], runs["padded-weights"]) < 1e-5
