"""The elastic rollout pool: a run's number of rollout workers, changed while it runs.

Two things ask for a size; the driver applies them between steps, after the step's weight
sync, when no rollout is in flight (``RolloutScaler.update``):

- ``flywheel scale OUT rollout=N`` writes ``OUT/control/scale.json``. The driver applies each
  request once (it carries an id); a resumed run applies the latest again, so the run keeps the
  size its user asked for.
- ``rollout.autoscale: {min_workers, max_workers}``: one more worker while the learner waits
  for rollouts (``scale_up_share`` of the step or more: on-policy the rollout's share, streaming
  the wait for the next batch), one fewer while the engines sit idle (busy under
  ``scale_down_share`` of the step), then ``cooldown_steps`` steps without a change so the next
  decision sees the new size's step time.

A new worker starts outside the run's placement group: on a cluster with an autoscaler, Ray
launches a node for it from the cluster YAML when no node has room. It takes work once it is
ready and holds the current weights (``RolloutPool.admit_joined``); the run does not wait for it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from services.core.config import FlywheelConfig, RolloutAutoscale
from services.core.errors import UserError

SCALE_REQUEST = Path("control") / "scale.json"
SERVICES = ("rollout",)  # what `flywheel scale` can resize


def parse_scale_args(assignments: list[str]) -> dict[str, int]:
    """``["rollout=2"]`` -> ``{"rollout": 2}``; a UserError names a bad one."""
    sizes = {}
    for item in assignments:
        service, _, count = item.partition("=")
        if service not in SERVICES:
            raise UserError(f"flywheel scale: {item!r}: say SERVICE=N with SERVICE one of {', '.join(SERVICES)}")
        try:
            sizes[service] = int(count)
        except ValueError:
            raise UserError(f"flywheel scale: {item!r}: N must be a whole number") from None
        if sizes[service] < 1:
            raise UserError(f"flywheel scale: {item!r}: a run needs at least 1 rollout worker")
    if not sizes:
        raise UserError("flywheel scale: say what to resize, e.g. rollout=2")
    return sizes


def write_scale_request(out: Path, sizes: dict[str, int]) -> Path:
    """Write a request the run in ``out`` applies after its current step (atomically: the
    driver never reads half a file)."""
    out = Path(out)
    if not (out / "config.yaml").is_file():
        raise UserError(f"{out} holds no Flywheel run (no config.yaml): give the --out of `flywheel train`")
    path = out / SCALE_REQUEST
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**sizes, "id": uuid.uuid4().hex, "written_at": time.time()}))
    os.replace(tmp, path)
    return path


def read_scale_request(out: Path) -> dict | None:
    """The latest request, or None (no file, or one that is not a request: it is left alone)."""
    try:
        request = json.loads((Path(out) / SCALE_REQUEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(request, dict) or not isinstance(request.get("rollout"), int) or request["rollout"] < 1:
        return None
    return request


def autoscale_target(workers: int, record: dict, streaming: bool, auto: RolloutAutoscale) -> int:
    """The worker count ``rollout.autoscale`` wants after a step with figures ``record``."""
    step_s, rollout_s = record.get("timing/step_s") or 0.0, record.get("timing/rollout_s") or 0.0
    if step_s <= 0 or rollout_s <= 0:  # no rollout timed on this step (a resumed run's first batch)
        return workers
    busy = rollout_s / step_s
    waited = (record.get("timing/rollout_wait_s", 0.0) / step_s) if streaming else busy
    if waited >= auto.scale_up_share and workers < auto.max_workers:
        return workers + 1
    if busy < auto.scale_down_share and workers > auto.min_workers:
        return workers - 1
    return min(max(workers, auto.min_workers), auto.max_workers)


class RolloutScaler:
    """Applies ``flywheel scale`` requests and ``rollout.autoscale`` to a ``RolloutPool``."""

    def __init__(self, pool, cfg: FlywheelConfig, out: Path):
        self.pool, self.cfg, self.out = pool, cfg, Path(out)
        self.applied: str | None = None  # id of the request applied last
        self.quiet_steps = 0  # steps measured since the start or the last change

    def update(self, last_record: dict | None) -> dict[str, float]:
        """Admit the workers that are ready, then apply a new request or the autoscaler's
        decision on the last step's figures; returns ``rollout/workers_target``."""
        before = len(self.pool.actors)
        admitted = self.pool.admit_joined()
        if admitted or len(self.pool.actors) != before:
            self.quiet_steps = 0
        elif last_record:  # a step measured at the current size (the first includes start-up)
            self.quiet_steps += 1
        request = read_scale_request(self.out)
        auto = self.cfg.rollout.autoscale
        target = self.pool.target_size
        if request is not None and request.get("id") != self.applied:
            self.applied, target = request.get("id"), request["rollout"]
        elif auto is not None and last_record and not self.pool.joining and self.quiet_steps >= auto.cooldown_steps:
            target = autoscale_target(len(self.pool.actors), last_record, self.cfg.algorithm.max_staleness >= 1, auto)
        if target != self.pool.target_size:
            self.pool.resize(target)
            self.quiet_steps = 0
        return {"rollout/workers_target": float(self.pool.target_size)}
