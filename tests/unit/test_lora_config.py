"""``learner.lora``: its settings and their errors, the merge every export makes (against
peft's own merge), and the clear errors of a target module the model lacks or of LoRA in a
stage that trains every weight."""

from __future__ import annotations

import textwrap

import pytest
import torch
import yaml

from services.core.config import FlywheelConfig, LearnerConfig
from services.core.config_loading import dump_config, load_config
from services.core.config_lora import DEFAULT_TARGET_MODULES, LoraConfig
from services.core.errors import UserError
from services.learner.lora import merged_state_dict, reject_lora, wrap_lora


def test_off_by_default_and_round_trips_through_config_yaml(tmp_path):
    assert FlywheelConfig().learner.lora is None
    cfg = load_config("grpo-toy", ["learner.lora.rank=4", "learner.lora.alpha=8", "learner.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.learner.lora == LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    assert cfg.learner.lora.scaling == 2.0
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg


def test_defaults_adapt_llama_and_qwen2_attention_and_mlp():
    lora = load_config("grpo-toy", ["learner.lora.rank=8"]).learner.lora
    assert lora.target_modules == list(DEFAULT_TARGET_MODULES)
    assert (lora.rank, lora.alpha, lora.dropout) == (8, 16.0, 0.0)


def test_a_yaml_section_sets_it(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent("""
        algorithm: {name: grpo}
        learner:
          lora: {rank: 16, dropout: 0.05}
    """))
    assert load_config(str(path)).learner.lora == LoraConfig(rank=16, dropout=0.05)


@pytest.mark.parametrize("override, message", [
    ("learner.lora.rank=0", "learner.lora.rank: Input should be greater than or equal to 1"),
    ("learner.lora.rank=1024", "learner.lora.rank: Input should be less than or equal to 512"),
    ("learner.lora.alpha=0", "learner.lora.alpha: Input should be greater than 0"),
    ("learner.lora.dropout=1.0", "learner.lora.dropout: Input should be less than 1"),
    ("learner.lora.target_modules=[]", "learner.lora.target_modules: .*at least one linear layer"),
    ("learner.lora.target_modules=[q_proj,q_proj]", "learner.lora.target_modules: .*lists a name twice"),
    ("learner.lora.target_modules=[q_proj,lm_head]", "learner.lora.target_modules: .*embeddings or the output head"),
    ("learner.lora.ranks=8", "learner.lora.ranks: unknown key"),
])
def test_bad_values_are_errors_naming_the_field(override, message):
    with pytest.raises(UserError, match=message):
        load_config("grpo-toy", [override])


def test_engine_rank_is_the_smallest_vllm_takes():
    assert [LoraConfig(rank=r).vllm_max_rank() for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


def test_merged_state_dict_is_peft_merge_and_unload():
    lora = LoraConfig(rank=4, alpha=12)
    model = wrap_lora(tiny_llama(), lora)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        adapted = model(ids).logits
    merged = merged_state_dict(model.state_dict(), lora.scaling)
    assert not any("lora" in k or "base_layer" in k or k.startswith("base_model") for k in merged)
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)
    plain = tiny_llama(seed=1)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted, atol=1e-5, rtol=0)
    passed = merged_state_dict(reference, 2.0)  # a plain state dict passes through
    assert passed.keys() == reference.keys() and all(passed[k] is v for k, v in reference.items())


def test_only_the_adapter_trains_and_starts_as_a_no_op():
    base = tiny_llama()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        expected = base(ids).logits
    model = wrap_lora(base, LoraConfig(rank=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)


def test_a_target_module_the_model_lacks_is_a_user_error():
    with pytest.raises(UserError, match=r"learner.lora.target_modules: .*no module named \['c_attn'\]"):
        wrap_lora(tiny_llama(), LoraConfig(target_modules=["q_proj", "c_attn"]))


def test_stages_that_train_every_weight_reject_lora():
    reject_lora(LearnerConfig(), "sft")
    with pytest.raises(UserError, match="learner.lora: `flywheel sft` trains every weight"):
        reject_lora(LearnerConfig(lora=LoraConfig()), "sft")


def test_reference_settings_are_refused_with_lora():
    """A LoRA run starts no reference actor, so a `reference.*` setting would be silently
    unused; the defaults (as a resolved config.yaml holds them) are fine."""
    with pytest.raises(UserError, match=r"reference\.packing, reference\.replicas: a LoRA run \(learner\.lora\) "
                                        "starts no reference actor"):
        load_config("grpo-toy", ["learner.lora.rank=8", "reference.replicas=2", "reference.packing=true"])
    resolved = dump_config(load_config("grpo-toy", ["learner.lora.rank=8"]))
    assert FlywheelConfig.model_validate(yaml.safe_load(resolved)).learner.lora.rank == 8
    assert load_config("grpo-toy", ["reference.replicas=2"]).reference.replicas == 2  # without LoRA: used
