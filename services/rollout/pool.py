"""RolloutPool: N RolloutWorker actors behind one ``generate`` and one ``sync_weights``.

Load balancing: prompts are cut into small chunks handed to whichever worker is free, so a
slow or busy worker takes fewer chunks. Weight sync puts the payload into Ray's object store
once, applies it on every worker in parallel, and raises ``WeightSyncTimeout`` naming the
workers that did not finish within ``rollout.sync_timeout_s`` — it never hangs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from services.core.batch_types import Trajectory
from services.core.actor_group import ActorGroup, placed
from services.core.config import FlywheelConfig
from services.rollout.weight_sync import WeightSyncTimeout, encode_weights

log = logging.getLogger(__name__)


class RolloutWorkerLost(RuntimeError):
    """A rollout worker died and Ray could not bring it back (restarts used up or start-up failed)."""


def _worker_lost_errors() -> tuple:
    from ray.exceptions import ActorUnavailableError, RayActorError

    return (RayActorError, ActorUnavailableError)
from services.rollout.worker import PromptItem, RolloutWorkerActor, SamplingSpec, chunk_sizes


class RolloutPool(ActorGroup):
    def __init__(self, model_dir: str, cfg: FlywheelConfig, start_timeout_s: float = 600.0,
                 placement: list[dict] | None = None):
        import ray

        self.cfg = cfg
        actor_cls = ray.remote(RolloutWorkerActor)
        options = cfg.rollout.resources.ray_options()
        # Ray restarts a dead worker (same bundle, __init__ again: base weights, version 0);
        # generate() and sync_weights() then push the current weights before it takes work
        restart = {"max_restarts": cfg.rollout.max_restarts, "max_task_retries": 0}
        self.actors = [
            actor_cls.options(max_concurrency=2, **restart, **placed(options, placement, i)).remote(str(model_dir), cfg, i)
            for i in range(cfg.rollout.num_workers)
        ]
        self.names = [f"rollout-{i}" for i in range(len(self.actors))]
        self.start_timeout_s = start_timeout_s
        ray.get([w.ready.remote() for w in self.actors], timeout=start_timeout_s)
        self.version = 0
        self.restarts = 0  # worker restarts so far (deaths and stuck workers)
        self._weights = None  # object ref of the latest published weights, for restarted workers

    def generate(self, prompts: list[PromptItem], sampling: SamplingSpec | None = None) -> list[Trajectory]:
        """Trajectories for all prompts (``sampling.n`` each), in prompt order. A chunk whose
        worker dies (or returns nothing within ``rollout.generate_timeout_s``) goes back to the
        queue; the worker is restarted and re-synced, so every prompt is generated exactly once."""
        import ray

        sampling = sampling or SamplingSpec.from_config(self.cfg)
        size = chunk_sizes(len(prompts), len(self.actors))
        pending_chunks = [(start, prompts[start : start + size]) for start in range(0, len(prompts), size)]
        results: dict[int, list[Trajectory]] = {}
        in_flight: dict[Any, tuple[int, int, float]] = {}  # ref -> (chunk start, worker, sent at)
        idle = list(range(len(self.actors)))
        timeout_s = self.cfg.rollout.generate_timeout_s
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
            else:  # the oldest chunk's worker is stuck: restart it, send the chunk again
                ref = min(in_flight, key=lambda r: in_flight[r][2])
                start, worker, _ = in_flight.pop(ref)
                log.warning("%s returned nothing within rollout.generate_timeout_s=%.0fs; restarting it",
                            self.names[worker], timeout_s)
                ray.kill(self.actors[worker], no_restart=False)
                chunk_result = None
            if chunk_result is None:
                pending_chunks.insert(0, (start, prompts[start : start + size]))
                self._recover(worker)
            else:
                results[start] = chunk_result
            idle.append(worker)
        return [t for start in sorted(results) for t in results[start]]

    def _chunk_result(self, ref, worker: int) -> list[Trajectory] | None:
        """A finished chunk's trajectories; None when its worker died or was restarted
        between calls (it answers from the base weights), so the chunk must be generated again."""
        import ray

        try:
            trajectories = ray.get(ref)
        except _worker_lost_errors() as exc:
            log.warning("%s died while generating (%s); its prompts go back to the queue",
                        self.names[worker], type(exc).__name__)
            return None
        if any(t.policy_version != self.version for t in trajectories):
            log.warning("%s answered with a policy version other than %d: it was restarted",
                        self.names[worker], self.version)
            return None
        return trajectories

    def _wait_restarted(self, worker: int) -> None:
        """Until ``worker`` answers ``ready()``: while Ray restarts it, calls fail at once with
        ActorUnavailableError, so ask again (up to the start-up timeout)."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                ray.get(self.actors[worker].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise ray.exceptions.GetTimeoutError(f"{self.names[worker]} is still restarting") from None
                time.sleep(1.0)

    def _recover(self, worker: int) -> None:
        """Wait for Ray to restart ``worker``, then load the current weights and version into it.
        Raises ``RolloutWorkerLost`` when Ray gives up on it (``rollout.max_restarts`` used up)."""
        import ray

        name = self.names[worker]
        self.restarts += 1
        started = time.perf_counter()
        try:
            self._wait_restarted(worker)
            if self._weights is not None:
                version = ray.get(self.actors[worker].update_weights.remote(self._weights, self.version),
                                  timeout=self.cfg.rollout.sync_timeout_s)
                if version != self.version:
                    raise RolloutWorkerLost(f"{name} came back with policy version {version}, not {self.version}")
        except _worker_lost_errors() as exc:
            raise RolloutWorkerLost(
                f"{name} died and could not be restarted (rollout.max_restarts={self.cfg.rollout.max_restarts}): {exc}"
            ) from None
        except ray.exceptions.GetTimeoutError:
            raise RolloutWorkerLost(f"{name} did not come back within {self.start_timeout_s:.0f}s after a restart") from None
        log.warning("%s restarted and re-synced to policy version %d in %.1fs", name, self.version,
                    time.perf_counter() - started)

    def sync_weights(self, state_dict_or_bytes: dict | bytes, version: int, timeout_s: float | None = None) -> dict:
        """Publish ``version`` to every worker in parallel; returns timing and size figures."""
        import ray

        timeout_s = timeout_s or self.cfg.rollout.sync_timeout_s
        started = time.perf_counter()
        payload = state_dict_or_bytes if isinstance(state_dict_or_bytes, bytes) else encode_weights(state_dict_or_bytes)
        encoded_s = time.perf_counter() - started
        ref = ray.put(payload)
        refs = {w.update_weights.remote(ref, version): i for i, w in enumerate(self.actors)}
        done, not_done = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if not_done:
            late = ", ".join(self.names[refs[r]] for r in not_done)
            raise WeightSyncTimeout(
                f"weight sync to policy version {version} did not finish within {timeout_s:.0f}s "
                f"on rollout worker(s): {late}"
            )
        previous = self._weights, self.version
        self._weights, self.version = ref, version  # what a worker restarted from here on loads
        for r in done:
            try:
                got = ray.get(r)  # re-raises a worker's own error (it names the actor)
            except _worker_lost_errors():  # died during the sync: restart it and load this version
                self._recover(refs[r])
                continue
            if got != version:
                self._weights, self.version = previous
                raise RuntimeError(f"{self.names[refs[r]]} reports policy version {got} after a sync to {version}")
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
