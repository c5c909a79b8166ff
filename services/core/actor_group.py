"""Plumbing shared by every service that runs as a set of Ray actors: placement, metrics,
and supervised calls.

Supervision: every wait on an actor has a timeout from config. A call whose actor died, or
that returned nothing within its timeout (the actor is then killed), is sent again once Ray
has restarted the actor (``max_restarts`` of the service) and ``after_restart`` has brought
it back up to date. With restarts used up (or ``max_restarts: 0``) the call fails with a
``ServiceTimeout`` or ``ServiceLost`` that names the actor, the call and the setting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from services.core.errors import ServiceLost, ServiceTimeout
from services.core.service_metrics import merge_expositions

log = logging.getLogger(__name__)
METRICS_TIMEOUT_S = 30.0  # a scrape must not hang on a busy or dead actor


def placed(options: dict, placement: list[dict] | None, index: int) -> dict:
    """Actor options plus the placement-group bundle reserved for actor ``index``, if any."""
    return {**options, **(placement[index] if placement else {})}


def actor_lost_errors() -> tuple:
    """What ``ray.get`` raises when the actor behind a call died or is restarting."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return (RayActorError, ActorUnavailableError)


class ActorGroup:
    """A set of Ray actors that each expose ``metrics_text()``; ``actors`` lists them all,
    ``names`` names them in errors ("reward-0/rm-1"), ``max_restarts`` is what Ray was told."""

    actors: list
    names: list[str] = []
    max_restarts: int = 0
    restarts_setting: str = "max_restarts"  # the config field behind max_restarts, for messages
    start_timeout_s: float = 600.0
    restarts: int = 0  # restarts this group went through (deaths and stuck calls)
    _pids: dict[int, int] | None = None  # actor index -> process id last seen
    _recovering: frozenset[int] = frozenset()  # being recovered (streaming: from another thread)

    def metrics_texts(self) -> list[str]:
        """Each actor's Prometheus text (labels ``service`` / ``replica`` keep them apart)."""
        import ray

        return ray.get([actor.metrics_text.remote() for actor in self.actors], timeout=METRICS_TIMEOUT_S)

    def metrics_text(self) -> str:
        return merge_expositions(self.metrics_texts())

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ supervision

    def name(self, index: int) -> str:
        return self.names[index] if index < len(self.names) else f"actor-{index}"

    def count_quiet_restarts(self) -> int:
        """Ask every actor for its process id; one that changed since last time was restarted
        by Ray without a call of ours noticing (it died while idle). Counts those into
        ``restarts`` and returns the total. Actors must expose ``process_id()``."""
        import ray

        refs = [actor.process_id.remote() for actor in self.actors]
        seen = self._pids if self._pids is not None else {}
        for index, ref in enumerate(refs):
            if index in self._recovering:  # recover() counts it and records its new process
                continue
            try:
                pid = ray.get(ref, timeout=METRICS_TIMEOUT_S)
            except (ray.exceptions.GetTimeoutError, *actor_lost_errors()):
                continue  # restarting or busy: the next call to it, or the next count, sees it
            if index in seen and seen[index] != pid:
                self.restarts += 1
                log.warning("%s was restarted by Ray while idle (process %d -> %d)", self.name(index), seen[index], pid)
            seen[index] = pid
        self._pids = seen
        return self.restarts

    def _known_pid(self, index: int) -> int | None:
        """The process id of actor ``index`` as last seen, or asked now (None if it does not answer)."""
        import ray

        if self._pids is not None and index in self._pids:
            return self._pids[index]
        try:
            return ray.get(self.actors[index].process_id.remote(), timeout=5.0)
        except (ray.exceptions.GetTimeoutError, *actor_lost_errors()):
            return None

    def after_restart(self, index: int) -> None:
        """Bring a restarted actor up to date before it takes work (rollout: the weights)."""

    def wait_restarted(self, index: int, old_pid: int | None = None) -> int:
        """Until actor ``index`` answers ``ready()`` from a process other than ``old_pid`` (a
        killed actor with a free concurrency slot can still answer from its old process for a
        moment); returns the new process id. While Ray restarts it, calls fail at once with
        ActorUnavailableError, so ask again, up to ``start_timeout_s``."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + self.start_timeout_s
        actor = self.actors[index]
        while True:
            try:
                ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                pid = ray.get(actor.process_id.remote(), timeout=max(1.0, deadline - time.monotonic()))
                if pid != old_pid:
                    return pid
            except ActorUnavailableError:
                pass
            except ray.exceptions.GetTimeoutError:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        raise ServiceLost(f"{self.name(index)} did not come back within {self.start_timeout_s:.0f}s after a restart "
                          f"({self.restarts_setting}={self.max_restarts})")

    def recover(self, index: int, old_pid: int | None = None) -> None:
        """Wait for Ray to restart actor ``index`` (away from process ``old_pid`` when given), then
        ``after_restart`` it. Raises ``ServiceLost`` when Ray gave up on it (``max_restarts`` used up)."""
        name = self.name(index)
        self.restarts += 1
        self._recovering = self._recovering | {index}
        started = time.perf_counter()
        try:
            pid = self.wait_restarted(index, old_pid)
            if self._pids is not None:  # the next count takes the new process as known
                self._pids[index] = pid
            self.after_restart(index)
        except actor_lost_errors() as exc:
            raise ServiceLost(
                f"{name} died and could not be restarted ({self.restarts_setting}={self.max_restarts}): "
                f"{type(exc).__name__}"
            ) from None
        finally:
            self._recovering = self._recovering - {index}
        log.warning("%s restarted and ready again in %.1fs", name, time.perf_counter() - started)

    def restart(self, index: int, problem: Exception, kill: bool) -> None:
        """``recover`` actor ``index`` after ``problem``, killing it first when it is stuck
        (``kill``; a dead one Ray restarts by itself). With no restarts allowed, raise ``problem``."""
        import ray

        if self.max_restarts == 0:
            raise problem
        log.warning("%s; restarting %s", problem, self.name(index))
        old_pid = None
        if kill:
            old_pid = self._known_pid(index)
            ray.kill(self.actors[index], no_restart=False)
        self.recover(index, old_pid)

    def get_supervised(self, index: int, ref, resend: Callable[[], Any], call: str, timeout_s: float,
                       setting: str) -> Any:
        """``ray.get(ref)`` for a call on actor ``index``. A dead or stuck actor is restarted and
        ``resend()`` submits the call again; this repeats until Ray has no restart left
        (``ServiceLost``). With ``max_restarts: 0`` the first timeout raises ``ServiceTimeout``."""
        import ray

        while True:
            try:
                return ray.get(ref, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                problem: Exception = ServiceTimeout(self.name(index), call, timeout_s, setting)
                stuck = True
            except actor_lost_errors() as exc:
                problem = ServiceLost(f"{self.name(index)} died during {call} ({type(exc).__name__})")
                stuck = False
            self.restart(index, problem, kill=stuck)
            ref = resend()


def gather(refs: list, names: list[str], call: str, timeout_s: float, setting: str) -> list:
    """Results of one call fanned out to several actors, in order, waiting at most ``timeout_s``
    for all of them: a ``ServiceTimeout`` names the late actors, a ``ServiceLost`` the first dead
    one as soon as it is seen (the others may be blocked in a collective with it). For services
    whose actors are not restarted, such as the learner's ranks."""
    import ray

    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise ServiceTimeout(", ".join(names[refs.index(r)] for r in pending), call, timeout_s, setting)
        try:
            ray.get(done[0])
        except actor_lost_errors() as exc:
            raise ServiceLost(f"{names[refs.index(done[0])]} died during {call} ({type(exc).__name__})") from None
    return ray.get(list(refs))
