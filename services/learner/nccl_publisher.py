"""Trainer side of the GPU weight sync: broadcast the policy's parameters to every vLLM
engine over NCCL with vLLM's ``NCCLTrainerWeightTransferEngine``.

**Unverified: written against vLLM 0.32's documented API, never run on a GPU.** The CPU path
(full state dict as safetensors bytes, in-place reload) is the verified one.
"""

from __future__ import annotations

from services.core.errors import UserError


def start_nccl_publisher(module, client, num_engines: int, ranks_per_engine: int, master_address: str,
                         master_port: int, zero_stage: int, rank: int = 0):
    """Join the NCCL group (trainer rank 0 + every engine's workers); returns the engine.

    Call ``publisher.send_weights()`` after each optimizer step, on every learner rank.
    """
    if zero_stage == 3:
        raise UserError(
            "learner.zero_stage: ZeRO-3 shards parameters, which the NCCL weight broadcast "
            "does not gather; use ZeRO 0-2 on GPU, or the CPU transport"
        )
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLTrainerInitInfo,
        NCCLTrainerWeightTransferEngine,
    )

    info = NCCLTrainerInitInfo(
        master_address=master_address,
        master_port=master_port,
        world_size=1 + num_engines * ranks_per_engine,
        rank=rank,
    )
    return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=ModuleSource(module))
