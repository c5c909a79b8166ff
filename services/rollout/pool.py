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
from dataclasses import dataclass
from typing import Any

from services.core.actor_group import START_TIMEOUT_S, ActorGroup, actor_lost_errors
from services.core.batch_types import Trajectory
from services.core.config import FlywheelConfig
from services.core.errors import ServiceLost, ServiceTimeout
from services.learner.lora import AdapterPayload
from services.rollout.nccl_client import PoolWeightSyncClient
from services.rollout.weight_sync import PublishedWeights, WeightSyncTimeout, payload_nbytes, shared_weights
from services.rollout.worker import PromptItem, RolloutWorkerActor, SamplingSpec, chunk_sizes

log = logging.getLogger(__name__)


@dataclass
class JoiningWorker:
    """A worker ``RolloutPool.resize`` started: it takes work once it answers ``ready()`` and
    holds the pool's weights (``admit_joined``)."""

    actor: Any
    name: str
    ready: Any  # the ready() call's object ref
    started: float  # time.monotonic()


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
        self.model_dir = str(model_dir)
        n = cfg.rollout.num_workers
        self.spawn(RolloutWorkerActor, [f"rollout-{i}" for i in range(n)], [(self.model_dir, cfg, i) for i in range(n)],
                   resources=cfg.rollout.resources.ray_options(), placement=placement, max_concurrency=2, wait=wait)
        self.joining: list[JoiningWorker] = []  # started by `resize`, not taking work yet
        self._next_index = n  # a new worker's index: never one a removed worker had (its log, its metrics)

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
        stats = {"rollout/requeued_prompts": float(requeued), "rollout/workers": float(len(self.actors)),
                 "rollout/worker_version_min": float(min(versions)),
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
        self._load_current(self.actors[worker], self.names[worker], "after a restart")

    def _load_current(self, actor, name: str, when: str) -> None:
        """Load the latest published weights and version into ``actor`` (a restarted or a new
        worker); nothing before the first sync (it holds the base weights, version 0)."""
        import ray

        if self._weights is None:
            return
        try:
            version = ray.get(actor.update_weights.remote(self._weights, self.version),
                              timeout=self.cfg.rollout.sync_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncTimeout(name, f"weight sync to policy version {self.version} {when}",
                                    self.cfg.rollout.sync_timeout_s) from None
        if version != self.version:
            raise ServiceLost(f"{name} came back with policy version {version}, not {self.version}")

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
            payload = weights if isinstance(weights, (bytes, AdapterPayload)) else shared_weights(weights)
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

    # ------------------------------------------------------------------ elastic size

    @property
    def target_size(self) -> int:
        """Workers taking work plus those starting."""
        return len(self.actors) + len(self.joining)

    def resize(self, count: int) -> None:
        """Toward ``count`` workers (at least 1). More: start the missing ones outside the run's
        placement group, so a cluster with an autoscaler launches nodes for them from its
        YAML; they take work once ``admit_joined`` sees them ready. Fewer: stop starting ones
        first, then the last working ones. Only between ``generate`` calls (the driver calls
        it after a step's sync), so a removed worker holds no prompts."""
        import ray

        count = max(1, count)
        while self.target_size < count:
            index, self._next_index = self._next_index, self._next_index + 1
            name = f"rollout-{index}"
            actor = self.start_actors(RolloutWorkerActor, [name], [(self.model_dir, self.cfg, index)],
                                      resources=self.cfg.rollout.resources.ray_options(), max_concurrency=2)[0]
            self.joining.append(JoiningWorker(actor, name, actor.ready.remote(), time.monotonic()))
            log.warning("%s starting (rollout workers: %d -> %d)", name, self.target_size - 1, count)
        while self.target_size > count:
            if self.joining:
                worker = self.joining.pop()
                ray.kill(worker.actor)
                log.warning("%s stopped before it took work", worker.name)
                continue
            index = len(self.actors) - 1
            ray.kill(self.actors.pop(), no_restart=True)
            name = self.names.pop()
            if self._pids is not None:
                self._pids.pop(index, None)
            log.warning("%s removed (rollout workers: %d)", name, len(self.actors))

    def admit_joined(self) -> list[str]:
        """Starting workers that are ready now load the pool's weights and version and take
        work from the next ``generate`` on; returns their names. One whose start failed, or
        that is not ready within ``start_timeout_s`` (the cluster could not place it), is
        dropped with a warning, and the run goes on with the others."""
        import ray

        admitted = []
        for worker in list(self.joining):
            done, _ = ray.wait([worker.ready], timeout=0)
            late = time.monotonic() - worker.started > self.start_timeout_s
            if not done and not late:
                continue
            self.joining.remove(worker)
            try:
                if not done:
                    raise ServiceTimeout(worker.name, "ready (start-up)", self.start_timeout_s, "start_timeout_s")
                ray.get(worker.ready)
                self._load_current(worker.actor, worker.name, "before it joins")
            except Exception as exc:  # noqa: BLE001 - a worker that cannot join is dropped, the run goes on
                ray.kill(worker.actor)
                log.warning("%s could not join the rollout pool (%s); the run goes on with %d workers",
                            worker.name, exc, len(self.actors))
                continue
            self.actors.append(worker.actor)
            self.names.append(worker.name)
            admitted.append(worker.name)
            log.warning("%s joined at policy version %d after %.1fs (rollout workers: %d)", worker.name,
                        self.version, time.monotonic() - worker.started, len(self.actors))
        return admitted

    def shutdown(self) -> None:
        import ray

        for worker in self.joining:
            ray.kill(worker.actor)
        self.joining = []
        super().shutdown()

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
