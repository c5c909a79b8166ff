"""LoRA on the learner (``learner.lora``): wrapping the policy with peft, the adapter as the
rollout engines take it, and the merged full model every export writes.

Names: peft wraps the HF model as ``base_model.model.<HF name>``; an adapted linear layer
``X`` holds ``X.base_layer.weight`` (frozen) and ``X.lora_A.default.weight`` [r, in] and
``X.lora_B.default.weight`` [out, r]. Its forward is ``base(x) + B(A(dropout(x))) * alpha / r``,
so the merged weight is ``W + (B @ A) * alpha / r`` (peft's own ``get_delta_weight``).
``merged_state_dict`` computes that from tensors alone, so the live model is never merged
and unmerged (which would not give back the same bits) and an offline export needs no peft.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass

from services.core.config_lora import LoraConfig
from services.core.errors import UserError
from services.learner.deepspeed_setup import import_deepspeed

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def wrap_lora(model, lora: LoraConfig):
    """``model`` as a peft model whose adapters (B = 0: an exact no-op at first) are its only
    trainable parameters. A target module the model lacks is a UserError naming the field."""
    from peft import get_peft_model

    linear = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in lora.target_modules if name.rsplit(".", 1)[-1] not in linear]
    if missing:
        raise UserError(f"learner.lora.target_modules: the model ({type(model).__name__}) has no module named "
                        f"{missing}; its modules include {sorted(n for n in linear if n.endswith('proj'))[:12]}")
    try:
        return get_peft_model(model, lora.peft_config())
    except ValueError as exc:  # e.g. a target that is not a linear layer
        raise UserError(f"learner.lora.target_modules: {exc}") from None


def reject_lora(learner, stage: str) -> None:
    """``learner.lora`` is for RL (`flywheel train`); ``stage`` trains every weight."""
    if learner.lora is not None:
        raise UserError(f"learner.lora: `flywheel {stage}` trains every weight; LoRA is for `flywheel train` "
                        "(RL): remove learner.lora")


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merged_state_dict(state: dict, scaling: float) -> dict:
    """A peft LoRA model's state dict -> the plain HF model's, each adapted weight merged:
    ``W + (B @ A) * scaling`` in fp32. A state dict without peft names comes back unchanged."""
    if not any(name.startswith(PEFT_PREFIX) for name in state):
        return dict(state)
    out = {}
    for name, tensor in state.items():
        if is_lora_name(name):
            continue
        plain = name.removeprefix(PEFT_PREFIX)
        if ".base_layer." in plain:
            layer, param = plain.split(".base_layer.")
            plain = f"{layer}.{param}"
            if param == "weight":
                a = state[f"{PEFT_PREFIX}{layer}.lora_A.{ADAPTER}.weight"].float()
                b = state[f"{PEFT_PREFIX}{layer}.lora_B.{ADAPTER}.weight"].float()
                tensor = tensor.float() + (b @ a) * scaling
        out[plain] = tensor
    return out


@dataclass(frozen=True)
class AdapterPayload:
    """What a LoRA weight sync sends each rollout engine: the adapter's tensors as the
    safetensors bytes of peft's ``adapter_model.safetensors`` (names without the adapter
    name, as ``save_pretrained`` writes them) and its ``adapter_config.json`` text."""

    tensors: bytes
    config_json: str

    @property
    def nbytes(self) -> int:
        return len(self.tensors) + len(self.config_json)


def adapter_payload(engine, lora: LoraConfig) -> AdapterPayload:
    """The current adapter of a DeepSpeed engine around a peft model (only the adapter's
    parameters are gathered under ZeRO-3, which is collective: every rank must call it)."""
    import torch
    from safetensors.torch import save

    params = [(name, p) for name, p in engine.module.named_parameters() if is_lora_name(name)]
    gathered = nullcontext()
    if engine.zero_optimization_stage() == 3:
        gathered = import_deepspeed().zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    with gathered:
        tensors = {name.replace(f".{ADAPTER}.", "."): p.detach().to("cpu", torch.float32).contiguous().clone()
                   for name, p in params}
    config = engine.module.peft_config[ADAPTER].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in peft: not JSON
    config.pop("runtime_config", None)
    return AdapterPayload(save(tensors), json.dumps(config, default=str))


def lora_of_run(config_yaml: dict) -> LoraConfig | None:
    """``learner.lora`` of a run's resolved config.yaml (as a dict), or None."""
    lora = (config_yaml.get("learner") or {}).get("lora")
    return LoraConfig(**lora) if lora else None
