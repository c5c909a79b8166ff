"""``learner.lora``: train a LoRA adapter on the frozen policy instead of every weight.

With ``learner.lora`` set (null, the default, is full fine-tuning), the learner wraps the
policy with peft before DeepSpeed so that only the adapter's matrices train, the reference
log-probs are the learner's own with the adapter disabled (no second copy of the model), and
each weight sync sends the rollout engines the adapter alone (vLLM's LoRA serving). Exports
(``OUT/policy``, ``flywheel export``) are the merged full model.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from services.core.config_base import Section

# Llama, Qwen2, Mistral and Gemma name their attention and MLP projections alike
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vLLM's LoRA serving takes these ranks (``max_lora_rank``); the engine is started with the
# smallest one >= ``rank``
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# the embeddings and output head: vLLM would need extra vocabulary handling for them, and a
# tied head would train the embedding twice
UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out")


class LoraConfig(Section):
    rank: int = Field(8, ge=1, le=VLLM_MAX_LORA_RANKS[-1],
                      description="LoRA rank r (at most 512, the largest rank vLLM serves)")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while training")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="names of the linear layers that get an adapter (default: Llama/Qwen2 attention and MLP "
        "projections); a name the model lacks is an error when the learner starts",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("target_modules must name at least one linear layer (e.g. q_proj, v_proj)")
        if len(set(names)) != len(names):
            raise ValueError(f"target_modules lists a name twice: {names}")
        if bad := [n for n in names if not n or n.split(".")[-1] in UNSUPPORTED_TARGETS]:
            raise ValueError(f"target_modules: {bad} are embeddings or the output head; LoRA here adapts the "
                             "decoder's linear projections only")
        return names

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def vllm_max_rank(self) -> int:
        return next(r for r in VLLM_MAX_LORA_RANKS if r >= self.rank)

    def peft_config(self):
        """The equivalent ``peft.LoraConfig`` (causal LM; adapters start as an exact no-op)."""
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                              target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")
