"""RolloutPool: N RolloutWorker actors behind one ``generate`` and one ``sync_weights``.

Load balancing: prompts are cut into small chunks handed to whichever worker is free, so a
slow or busy worker takes fewer chunks. Weight sync puts the payload into Ray's object store
once and applies it on every worker in parallel.

Supervision (see ``ActorGroup``): Ray restarts a dead worker (``rollout.max_restarts``); the
pool waits for it and loads the current weights and version into it before it takes work
again. A chunk whose worker died, was restarted (it answers with another version) or was
silent for ``rollout.generate_timeout_s`` (it is then killed) goes back to the queue, so every
prompt is generated exactly once. A worker that does not finish a sync within
``rollout.sync_timeout_s`` is restarted the same way; with ``rollout.max_restarts: 0`` that is
a ``WeightSyncTimeout`` naming the late workers instead. Nothing waits without a bound.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from services.core.actor_group import START_TIMEOUT_S, ActorGroup, actor_lost_errors
from services.core.batch_types import Trajectory
from services.core.config import FlywheelConfig
from services.core.errors import ServiceLost, ServiceTimeout
from services.rollout.nccl_client import PoolWeightSyncClient
from services.rollout.weight_sync import PublishedWeights, WeightSyncTimeout, payload_nbytes, shared_weights
from services.rollout.worker import PromptItem, RolloutWorkerActor, SamplingSpec, chunk_sizes

log = logging.getLogger(__name__)


class RolloutPool(ActorGroup):
    def __init__(self, model_dir: str, cfg: FlywheelConfig, start_timeout_s: float = START_TIMEOUT_S,
                 placement: list[dict] | None = None, wait: bool = True):
        # Ray restarts a dead worker (same bundle, __init__ again: base weights, version 0);
        # after_restart then pushes the current weights before it takes work
        super().__init__(max_restarts=cfg.rollout.max_restarts, restarts_setting="rollout.max_restarts",
                         start_timeout_s=start_timeout_s)
        self.cfg = cfg
        self.version = 0
        self._weights = None  # object ref of the latest published weights, for restarted workers
        n = cfg.rollout.num_workers
        self.spawn(RolloutWorkerActor, [f"rollout-{i}" for i in range(n)], [(str(model_dir), cfg, i) for i in range(n)],
                   resources=cfg.rollout.resources.ray_options(), placement=placement, max_concurrency=2, wait=wait)

    def generate(self, prompts: list[PromptItem], sampling: SamplingSpec | None = None) -> list[Trajectory]:
        """Trajectories for all prompts (``sampling.n`` each), in prompt order."""
        return self.generate_with_stats(prompts, sampling)[0]

    def generate_with_stats(self, prompts: list[PromptItem], sampling: SamplingSpec | None = None
                            ) -> tuple[list[Trajectory], dict[str, float]]:
        """``generate`` plus ``rollout/requeued_prompts`` (prompts generated again after a worker
        died or stuck) and the versions every worker holds afterwards."""
        import ray

        sampling = sampling or SamplingSpec.from_config(self.cfg)
        size = chunk_sizes(len(prompts), len(self.actors))
        pending_chunks = [(start, prompts[start : start + size]) for start in range(0, len(prompts), size)]
        results: dict[int, list[Trajectory]] = {}
        in_flight: dict[Any, tuple[int, int, float]] = {}  # ref -> (chunk start, worker, sent at)
        idle = list(range(len(self.actors)))
        timeout_s = self.cfg.rollout.generate_timeout_s
        requeued = 0
        while pending_chunks or in_flight:
            while idle and pending_chunks:
                worker, (start, chunk) = idle.pop(0), pending_chunks.pop(0)
                ref = self.actors[worker].generate.remote(chunk, sampling)
                in_flight[ref] = (start, worker, time.monotonic())
            oldest = min(sent for _, _, sent in in_flight.values())
            wait_s = max(0.0, oldest + timeout_s - time.monotonic())
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
            if done:
                start, worker, _ = in_flight.pop(done[0])
                chunk_result = self._chunk_result(done[0], worker)
                if chunk_result is None:
                    self.recover(worker)
            else:  # the oldest chunk's worker is stuck: restart it, send the chunk again
                ref = min(in_flight, key=lambda r: in_flight[r][2])
                start, worker, _ = in_flight.pop(ref)
                self.restart(worker, ServiceTimeout(self.names[worker], "generate", timeout_s,
                                                    "rollout.generate_timeout_s"), kill=True)
                chunk_result = None
            if chunk_result is None:
                pending_chunks.insert(0, (start, prompts[start : start + size]))
                requeued += len(pending_chunks[0][1])
            else:
                results[start] = chunk_result
            idle.append(worker)
        versions = self.versions()
        stats = {"rollout/requeued_prompts": float(requeued), "rollout/worker_version_min": float(min(versions)),
                 "rollout/worker_version_max": float(max(versions))}
        return [t for start in sorted(results) for t in results[start]], stats

    def _chunk_result(self, ref, worker: int) -> list[Trajectory] | None:
        """A finished chunk's trajectories; None when its worker died or was restarted
        between calls (it answers from the base weights), so the chunk must be generated again."""
        import ray

        try:
            trajectories = ray.get(ref)
        except actor_lost_errors() as exc:
            log.warning("%s died while generating (%s); its prompts go back to the queue",
                        self.names[worker], type(exc).__name__)
            return None
        if any(t.policy_version != self.version for t in trajectories):
            log.warning("%s answered with a policy version other than %d: it was restarted",
                        self.names[worker], self.version)
            return None
        return trajectories

    def after_restart(self, worker: int) -> None:
        """Load the current weights and version into a restarted worker."""
        import ray

        if self._weights is None:
            return
        try:
            version = ray.get(self.actors[worker].update_weights.remote(self._weights, self.version),
                              timeout=self.cfg.rollout.sync_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncTimeout(self.names[worker], f"weight sync to policy version {self.version} after a restart",
                                    self.cfg.rollout.sync_timeout_s) from None
        if version != self.version:
            raise ServiceLost(f"{self.names[worker]} came back with policy version {version}, not {self.version}")

    def sync_weights(self, weights: PublishedWeights | dict | bytes, version: int, timeout_s: float | None = None
                     ) -> dict:
        """Publish ``version`` to every worker in parallel; returns timing and size figures.
        A worker that died or is late is restarted and loaded with this version (see the module).
        ``PublishedWeights`` (``LearnerGroup.publish_weights``) are in the object store
        already; a state dict goes there as ``shared_weights``; safetensors bytes
        (``encode_weights``) as they are."""
        import ray

        timeout_s = timeout_s or self.cfg.rollout.sync_timeout_s
        started = time.perf_counter()
        if isinstance(weights, PublishedWeights):
            payload, ref = weights, weights.ref
        else:
            payload = weights if isinstance(weights, bytes) else shared_weights(weights)
            ref = ray.put(payload)
        stored_s = time.perf_counter() - started  # encoding and the put into the object store
        refs = {w.update_weights.remote(ref, version): i for i, w in enumerate(self.actors)}
        _, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        self._weights, self.version = ref, version  # what a worker restarted from here on loads
        if late:
            names = ", ".join(self.names[refs[r]] for r in late)
            problem = WeightSyncTimeout(names, f"weight sync to policy version {version}", timeout_s)
            if self.max_restarts == 0:
                raise problem
            for r in late:
                self.restart(refs[r], problem, kill=True)
        for r, worker in refs.items():
            if r in late:
                continue
            try:
                got = ray.get(r)  # re-raises a worker's own error (it names the actor)
            except actor_lost_errors():  # died during the sync: restart it and load this version
                self.recover(worker)
                continue
            if got != version:
                raise RuntimeError(f"{self.names[worker]} reports policy version {got} after a sync to {version}")
        elapsed = time.perf_counter() - started
        return {"sync/seconds": elapsed, "sync/store_s": stored_s, "sync/bytes": payload_nbytes(payload)}

    def nccl_client(self):
        """The control-plane client the learner's NCCL publisher drives (GPU path, unverified)."""
        return PoolWeightSyncClient(self.actors, self.names, self.cfg.rollout.sync_timeout_s)

    def versions(self) -> list[int]:
        """The policy version each worker holds (a dead or stuck worker is restarted and re-synced)."""
        return self.call_supervised(range(len(self.actors)), lambda i: self.actors[i].get_version.remote(),
                                    "get_version", self.cfg.rollout.sync_timeout_s, "rollout.sync_timeout_s")

    def sequence_logprobs(self, prompt_ids, response_ids, worker: int = 0) -> list[list[float]]:
        import ray

        return ray.get(self.actors[worker].sequence_logprobs.remote(prompt_ids, response_ids),
                       timeout=self.cfg.rollout.generate_timeout_s)

    def engine_process_ids(self, worker: int) -> list[int]:
        import ray

        return ray.get(self.actors[worker].engine_process_ids.remote(), timeout=self.cfg.rollout.sync_timeout_s)
