"""Benchmark: remote reward scoring over gRPC on loopback against the same ensemble in process.

    .venv/bin/python tests/bench/bench_grpc_overhead.py [--samples 64] [--requests 200]

A 3-member noisy-gold WCO ensemble (cheap members, so the figure is the transport's cost),
served by ``serve_reward`` on 127.0.0.1 and called through ``RewardClient``; prints the mean
milliseconds per request of each side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    from services.core.config import RewardConfig, RewardServerConfig, ScorerConfig
    from services.reward.ensemble import RewardEnsemble
    from services.reward.grpc_client import RewardClient
    from services.reward.grpc_server import serve_reward

    cfg = RewardConfig(
        scorers=[ScorerConfig(kind="toy_noisy_gold", seed=k, name=f"rm-{k}") for k in range(3)], aggregate="wco",
        server=RewardServerConfig(port=0, token_env=None),
    )
    ensemble = RewardEnsemble(cfg)
    server, port = serve_reward(cfg, ensemble)
    client = RewardClient(f"127.0.0.1:{port}", timeout_s=10, retries=0)
    prompts, completions = ["list 3 colors:"] * args.samples, [" red blue green"] * args.samples
    try:
        assert client.score(prompts, completions).scores == ensemble.score(prompts, completions).scores
        timings = {}
        for name, call in (("in process", lambda: ensemble.score(prompts, completions)),
                           ("gRPC loopback", lambda: client.score(prompts, completions))):
            started = time.perf_counter()
            for _ in range(args.requests):
                call()
            timings[name] = (time.perf_counter() - started) / args.requests * 1000
    finally:
        client.close()
        server.stop(0)
    print(f"\n{args.samples} samples per request, 3 members, {args.requests} requests")
    for name, ms in timings.items():
        print(f"{name:>14}: {ms:6.2f} ms per request")
    print(f"gRPC overhead: {timings['gRPC loopback'] - timings['in process']:.2f} ms per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
