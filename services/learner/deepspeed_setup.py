"""DeepSpeed engine construction shared by SFT, the RL learner and reward-model training.

On a machine without CUDA it uses DeepSpeed's CPU accelerator with the gloo backend and
fp32 (or bf16); fp16 is rejected there. On GPUs it uses NCCL (unverified so far, see README).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import warnings

from services.core.config import LearnerConfig
from services.core.errors import UserError


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ensure_dist_env(rank: int = 0, world_size: int = 1, master_port: int | None = None) -> None:
    """torch.distributed's env rendezvous; without it DeepSpeed goes looking for MPI."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(master_port or free_port()))


def import_deepspeed():
    """Import DeepSpeed quietly, on the CPU accelerator when there is no CUDA."""
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # ZeRO-3 calls torch.distributed collectives that torch 2.13 marks deprecated; not ours to fix
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


def unpacked_stage(learner: LearnerConfig, stage: str) -> None:
    """``learner.packing`` is the RL learner's (``flywheel train``); a stage with its own
    padded training loop says so rather than ignoring it."""
    if learner.packing:
        raise UserError(f"learner.packing: `flywheel {stage}` trains on padded micro-batches of "
                        "learner.micro_batch_size rows and does not pack sequences; remove learner.packing "
                        "(and learner.max_tokens_per_micro_batch) for this stage")


def default_dtype(dtype: str | None) -> str:
    """``dtype`` or, when None, bf16 on GPUs and fp32 on CPU; fp16 on CPU is a UserError."""
    on_gpu = cuda_available()
    dtype = dtype or ("bf16" if on_gpu else "fp32")
    if dtype == "fp16" and not on_gpu:
        raise UserError("model.dtype: fp16 is not supported by DeepSpeed on CPU; use fp32 or bf16")
    return dtype


def deepspeed_config(
    learner: LearnerConfig, dtype: str, world_size: int = 1, managed_accumulation: bool = True
) -> dict:
    """The DeepSpeed config dict. With ``managed_accumulation=False`` the caller owns the
    accumulation boundary: any number of ``engine.backward`` calls, then one ``engine.step``
    (the RL learner's train_step takes one optimizer step per batch of any size)."""
    dtype = default_dtype(dtype)
    config = {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,
        "gradient_accumulation_steps": learner.grad_accum_steps,
        "train_batch_size": learner.micro_batch_size * learner.grad_accum_steps * world_size,
        "gradient_clipping": learner.max_grad_norm,
        "zero_optimization": {"stage": learner.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if learner.zero_stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if dtype == "fp16":
        config["fp16"] = {"enabled": True}
    if not managed_accumulation:
        config["managed_gradient_accumulation"] = False
        config["gradient_accumulation_steps"] = 1
        config["train_batch_size"] = learner.micro_batch_size * world_size
    return config


def init_engine(
    model,
    learner: LearnerConfig,
    dtype: str,
    total_steps: int,
    lr: float | None = None,
    managed_accumulation: bool = True,
):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and linear warmup + cosine decay
    (``lr`` overrides ``learner.lr``, e.g. for the critic)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    ensure_dist_env()
    deepspeed = import_deepspeed()
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # "DeepSpeed <op> built successfully"
        deepspeed.init_distributed(dist_backend="nccl" if cuda_available() else "gloo")
    if message := printed.getvalue().strip():
        logging.getLogger(__name__).info("deepspeed.init_distributed: %s", message)
    world_size = int(os.environ["WORLD_SIZE"])
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr or learner.lr, weight_decay=learner.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(learner.warmup_steps, total_steps // 2), num_training_steps=total_steps
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(learner, dtype, world_size, managed_accumulation),
    )
    _keep_grad_norm(engine)
    return engine


def _keep_grad_norm(engine) -> None:
    """Without ZeRO, bf16 or fp16 DeepSpeed clips gradients but drops the norm, so
    ``get_global_grad_norm()`` stays None; keep it (the gradients are already all-reduced)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return

    def clip_fp32_gradients():
        norm = clip_grad_norm_(engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_fp32_gradients


def full_state_dict(engine) -> dict:
    """Full (unsharded) weights on CPU; gathers ZeRO-3 partitions."""
    deepspeed = import_deepspeed()
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def hf_state_dict(engine) -> dict:
    """Full weights named as in the model's ``model.safetensors``: tied aliases (``lm_head``
    tied to the embeddings) dropped, floating tensors CPU fp32 and contiguous. Gathers ZeRO-3
    partitions, which is collective: with several ranks every rank must call it."""
    import torch

    module = engine.module
    every_name = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    unique = {name for name, _ in module.named_parameters()}
    return {
        name: (tensor.to(torch.float32) if tensor.is_floating_point() else tensor).contiguous()
        for name, tensor in full_state_dict(engine).items()
        if name in unique or name not in every_name
    }
