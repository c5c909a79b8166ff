"""The trajectory buffer of a streaming run (``algorithm.max_staleness`` = k >= 1).

Rollout jobs run one at a time, in the order they were queued, on a thread of their own,
while the driver's thread scores and trains. The driver queues the job for step s + k when
step s begins, with the weights the learner has then (version s - 1), and takes the job for
step s off the front; so the buffer holds the batches of the next k steps, the rollout side
never waits for the learner unless it is k batches ahead, and every batch is trained on with
a staleness of exactly k once the first k have gone (0, 1, .., k - 1 for those, sampled by the
initial weights). Which version samples which step depends on the step numbers only, never
on timing, which is what keeps a resumed run bit-identical: a checkpoint saves the k batches
queued ahead (``pending``) and a resumed run puts them back first (``start``).

A job first loads the weights it was queued with, if they are newer than the engines'
(engines take a weight update only while idle, and the thread runs one job at a time, so a
sync never waits on another thread's generation), then applies the pool's scaling, then
samples. Other work that needs idle engines (the held-out evaluation) goes through ``run``:
it waits its turn behind the queued jobs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

Batch = tuple  # (trajectories, rollout seconds, rollout figures), as Driver._generate returns them


def load_weights(rollout, weights, version: int) -> dict[str, float]:
    """``weights`` of ``version`` into the engines (idle ones), unless they are None or the
    engines hold that version already; the step's ``timing/sync_s`` and ``sync/bytes`` (LoRA:
    the adapter's)."""
    if weights is None or rollout.version >= version:
        return {"timing/sync_s": 0.0, "sync/bytes": 0.0}
    info = rollout.sync_weights(weights, version)
    return {"timing/sync_s": info["sync/seconds"], "sync/bytes": float(info.get("sync/bytes", 0.0))}


class RolloutBuffer:
    """``draw()``: the next batch's prompts (on the driver's thread, in step order);
    ``generate(prompts)``: their ``Batch``; ``scaler``: a ``RolloutScaler``."""

    def __init__(self, learner, rollout, scaler, draw: Callable[[], list], generate: Callable[[list], Batch]):
        self.learner, self.rollout, self.scaler = learner, rollout, scaler
        self._draw, self._generate = draw, generate
        self.published = rollout.version  # the newest policy version sent to the engines
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flywheel-rollout")
        self._queue: deque[Future] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def start(self, pending: list[Batch], more: int) -> None:
        """``pending`` (a resumed run's saved batches) first, then ``more`` rollouts queued."""
        for batch in pending:
            future: Future = Future()
            future.set_result(batch)
            self._queue.append(future)
        for _ in range(more):
            self.queue_next(None)

    def queue_next(self, last_record: dict | None) -> None:
        """Queue the rollout of the next prompts drawn, by the learner's weights now;
        ``last_record``: the last step's figures, for the autoscaler."""
        weights, version = self._publish()
        self._queue.append(self._thread.submit(self._job, self._draw(), weights, version, last_record))

    def take(self) -> Batch:
        """The oldest batch (waits for it), off the buffer."""
        return self._queue.popleft().result()

    def newest(self) -> Batch:
        """The batch queued last (waits for it and every one before it)."""
        return self._queue[-1].result()

    def pending(self) -> list[Batch]:
        """Every queued batch, oldest first (waits for them all); they stay queued."""
        return [future.result() for future in self._queue]

    def run(self, job: Callable[[], Any]) -> Any:
        """``job()`` after the queued rollouts, on engines holding the learner's weights now;
        waits for its result (not kept in the buffer)."""
        weights, version = self._publish()
        return self._thread.submit(lambda: (load_weights(self.rollout, weights, version), job())[1]).result()

    def close(self) -> None:
        """Drop the rollouts not started yet (one running now finishes on its own)."""
        self._queue.clear()
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _publish(self):
        """The learner's weights and version; the weights None where the engines were sent
        that version already."""
        version = self.learner.policy_version
        weights = self.learner.publish_weights() if version > self.published else None
        self.published = version
        return weights, version

    def _job(self, prompts: list, weights, version: int, last_record: dict | None) -> Batch:
        sync = load_weights(self.rollout, weights, version)
        scaled = self.scaler.update(last_record)
        trajectories, rollout_s, stats = self._generate(prompts)
        return trajectories, rollout_s, {**stats, **scaled, **sync}


__all__ = ["Batch", "RolloutBuffer", "load_weights"]
