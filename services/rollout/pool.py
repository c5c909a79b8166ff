"""RolloutPool: N RolloutWorker actors behind one ``generate`` and one ``sync_weights``.

Load balancing: prompts are cut into small chunks handed to whichever worker is free, so a
slow or busy worker takes fewer chunks. Weight sync puts the payload into Ray's object store
once, applies it on every worker in parallel, and raises ``WeightSyncTimeout`` naming the
workers that did not finish within ``rollout.sync_timeout_s`` — it never hangs.
"""

from __future__ import annotations

import time
from typing import Any

from services.core.batch_types import Trajectory
from services.core.actor_group import ActorGroup, placed
from services.core.config import FlywheelConfig
from services.rollout.weight_sync import WeightSyncTimeout, encode_weights
from services.rollout.worker import PromptItem, RolloutWorkerActor, SamplingSpec, chunk_sizes


class RolloutPool(ActorGroup):
    def __init__(self, model_dir: str, cfg: FlywheelConfig, start_timeout_s: float = 600.0,
                 placement: list[dict] | None = None):
        import ray

        self.cfg = cfg
        actor_cls = ray.remote(RolloutWorkerActor)
        options = cfg.rollout.resources.ray_options()
        self.actors = [
            actor_cls.options(max_concurrency=2, **placed(options, placement, i)).remote(str(model_dir), cfg, i)
            for i in range(cfg.rollout.num_workers)
        ]
        self.names = [f"rollout-{i}" for i in range(len(self.actors))]
        ray.get([w.ready.remote() for w in self.actors], timeout=start_timeout_s)
        self.version = 0

    def generate(self, prompts: list[PromptItem], sampling: SamplingSpec | None = None) -> list[Trajectory]:
        """Trajectories for all prompts (``sampling.n`` each), in prompt order."""
        import ray

        sampling = sampling or SamplingSpec.from_config(self.cfg)
        size = chunk_sizes(len(prompts), len(self.actors))
        pending_chunks = [(start, prompts[start : start + size]) for start in range(0, len(prompts), size)]
        results: dict[int, list[Trajectory]] = {}
        in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (chunk start, worker index)
        idle = list(range(len(self.actors)))
        while pending_chunks or in_flight:
            while idle and pending_chunks:
                worker, (start, chunk) = idle.pop(0), pending_chunks.pop(0)
                in_flight[self.actors[worker].generate.remote(chunk, sampling)] = (start, worker)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            start, worker = in_flight.pop(done[0])
            results[start] = ray.get(done[0])
            idle.append(worker)
        return [t for start in sorted(results) for t in results[start]]

    def sync_weights(self, state_dict_or_bytes: dict | bytes, version: int, timeout_s: float | None = None) -> dict:
        """Publish ``version`` to every worker in parallel; returns timing and size figures."""
        import ray

        timeout_s = timeout_s or self.cfg.rollout.sync_timeout_s
        started = time.perf_counter()
        payload = state_dict_or_bytes if isinstance(state_dict_or_bytes, bytes) else encode_weights(state_dict_or_bytes)
        encoded_s = time.perf_counter() - started
        ref = ray.put(payload)
        refs = {w.update_weights.remote(ref, version): name for w, name in zip(self.actors, self.names)}
        done, not_done = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if not_done:
            late = ", ".join(refs[r] for r in not_done)
            raise WeightSyncTimeout(
                f"weight sync to policy version {version} did not finish within {timeout_s:.0f}s "
                f"on rollout worker(s): {late}"
            )
        versions = ray.get(done)  # re-raises a worker's own error (it names the actor)
        assert versions == [version] * len(versions), versions
        self.version = version
        elapsed = time.perf_counter() - started
        return {"sync/seconds": elapsed, "sync/encode_s": encoded_s, "sync/bytes": len(payload)}

    def nccl_client(self):
        """The control-plane client the learner's NCCL publisher drives (GPU path, unverified)."""
        from services.rollout.nccl_client import PoolWeightSyncClient

        return PoolWeightSyncClient(self.actors, self.names, self.cfg.rollout.sync_timeout_s)

    def versions(self) -> list[int]:
        import ray

        return ray.get([w.get_version.remote() for w in self.actors])

    def sequence_logprobs(self, prompt_ids, response_ids, worker: int = 0) -> list[list[float]]:
        import ray

        return ray.get(self.actors[worker].sequence_logprobs.remote(prompt_ids, response_ids))

    def engine_process_ids(self, worker: int) -> list[int]:
        import ray

        return ray.get(self.actors[worker].engine_process_ids.remote())
