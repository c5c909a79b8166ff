"""Plumbing shared by every service that runs as a set of Ray actors: the actor base
(``ServiceActor``), start-up (``ActorGroup.spawn``), placement, metrics, and supervised calls.

Supervision: every wait on an actor has a timeout from config. A call whose actor died, or
that returned nothing within its timeout (the actor is then killed), is sent again once Ray
has restarted the actor (``max_restarts`` of the service) and ``after_restart`` has brought
it back up to date. With restarts used up (or ``max_restarts: 0``) the call fails with a
``ServiceTimeout`` or ``ServiceLost`` that names the actor, the call and the setting.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from services.core.errors import ServiceLost, ServiceTimeout
from services.core.service_metrics import ServiceMetrics, merge_expositions

log = logging.getLogger(__name__)
METRICS_TIMEOUT_S = 30.0  # a scrape must not hang on a busy or dead actor
START_TIMEOUT_S = 600.0  # model loads and engine start-up
_service_log_dir: str | None = None  # set by `send_service_logs_to` in the driver process


def send_service_logs_to(directory: str | os.PathLike | None) -> None:
    """From now on, actors that ``ActorGroup.spawn`` starts in this process write their stdout
    and stderr (model loading, vLLM, DeepSpeed, warnings, tracebacks) to
    ``directory/<actor name>.log`` instead of Ray's worker logs, which Ray echoes to the
    driver's terminal unless ``ray.init(log_to_driver=False)``; None: leave them to Ray."""
    global _service_log_dir
    _service_log_dir = None if directory is None else str(directory)


def service_log_path(directory: str, name: str) -> str:
    """``directory/<name>.log`` with the actor's name made a file name ("learner rank 0" ->
    "learner-rank-0.log", "reward-0/rm-1" -> "reward-0-rm-1.log")."""
    return os.path.join(directory, re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") + ".log")


def write_output_to(path: str) -> bool:
    """Points this process's stdout and stderr (file descriptors 1 and 2, so C++ and child
    process output too) at ``path``, appended: a restarted actor continues its file. A path
    that cannot be written (another node without that directory) leaves the output to Ray
    and says so there: False."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        print(f"cannot write this actor's output to {path} ({exc}); it stays in Ray's worker log", file=sys.stderr)
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return True


def placed(options: dict, placement: list[dict] | None, index: int) -> dict:
    """Actor options plus the placement-group bundle reserved for actor ``index``, if any."""
    return {**options, **(placement[index] if placement else {})}


def actor_lost_errors() -> tuple:
    """What ``ray.get`` raises when the actor behind a call died or is restarting."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return (RayActorError, ActorUnavailableError)


def takes_all_cores(resources) -> bool:
    """Whether an actor with these resources computes on every CPU core of its node
    (``use_cpu_threads``): no GPU, no cpu_threads and under one num_cpus."""
    return resources.num_gpus == 0 and resources.cpu_threads is None and resources.num_cpus < 1


def use_cpu_threads(resources, share: int = 1) -> int:
    """Sets torch's intra-op threads in this actor process and returns the number. Ray sets
    OMP_NUM_THREADS=1 in an actor without num_cpus, so on the CPU a learner or reference
    model computed on one core while the others idled (2x slower on 2 cores). Order:
    ``resources.cpu_threads``; floor(num_cpus) when at least 1; on a GPU, Ray's setting; else
    the cores this process may run on, divided by ``share`` (the service's actors that run at
    the same time, such as learner ranks)."""
    import math

    import torch

    threads = resources.cpu_threads
    if threads is None and resources.num_cpus >= 1:
        threads = math.floor(resources.num_cpus)
    if threads is None and (resources.num_gpus > 0 or torch.cuda.is_available()):
        return torch.get_num_threads()
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // max(1, share))
    torch.set_num_threads(threads)
    return threads


class ServiceActor:
    """Base of every service's Ray actor class: what its ``ActorGroup`` asks of each actor.
    ``__init__`` of a subclass sets ``name`` (its repr, so Ray's state API and dashboard tell
    the actors apart) and ``metrics`` (its ServiceMetrics)."""

    name: str  # annotations only: no class attribute, so __repr__ sees '?' until __init__ sets it
    metrics: ServiceMetrics

    def __init_subclass__(cls, **kwargs) -> None:
        """A subclass's ``__init__`` also takes ``service_log``: a file that the actor's stdout
        and stderr go to from before its own start-up on (``ActorGroup.spawn`` passes it)."""
        super().__init_subclass__(**kwargs)
        init = cls.__init__  # its own, or the one it inherits (from a service class without the wrapper)
        if getattr(init, "takes_service_log", False):
            return

        @functools.wraps(init)
        def __init__(self, *args, service_log: str | None = None, **kw) -> None:
            if service_log is not None:
                write_output_to(service_log)
            init(self, *args, **kw)

        del __init__.__wrapped__  # Ray checks a call against inspect.signature, which would follow it
        __init__.takes_service_log = True
        cls.__init__ = __init__

    def ready(self) -> str:
        """Answers once ``__init__`` has finished (start-up and restarts wait for it)."""
        return self.name

    def process_id(self) -> int:
        """This actor's process; another one after Ray restarted it."""
        return os.getpid()

    def metrics_text(self) -> str:
        """This actor's Prometheus text."""
        return self.metrics.exposition()

    def __repr__(self) -> str:  # Ray's state API and dashboard show it (repr_name), maybe before __init__ ended
        return f"{type(self).__name__}({getattr(self, 'name', '?')})"


class ActorGroup:
    """A set of Ray ``ServiceActor`` actors: ``actors`` lists them all, ``names`` names them in
    errors ("reward-0/rm-1"), ``max_restarts`` is what Ray was told (``restarts_setting``: the
    config field behind it, for messages), ``restarts`` counts the restarts this group went
    through (deaths and stuck calls). A group whose actors are not restarted (the learner's
    ranks) keeps ``max_restarts=0`` and uses only ``spawn``, ``gather``, metrics and shutdown."""

    def __init__(self, *, max_restarts: int = 0, restarts_setting: str = "max_restarts",
                 start_timeout_s: float = START_TIMEOUT_S):
        self.actors: list = []
        self.names: list[str] = []
        self.max_restarts = max_restarts
        self.restarts_setting = restarts_setting
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._pids: dict[int, int] | None = None  # actor index -> process id last seen
        self._recovering: frozenset[int] = frozenset()  # being recovered (streaming: from another thread)

    def spawn(self, actor_cls: type, names: list[str], args: list[tuple], *, resources: dict,
              placement: list[dict] | None = None, kwargs: list[dict] | None = None,
              options: list[dict] | None = None, max_concurrency: int | None = None, wait: bool = True) -> list:
        """One ``actor_cls(*args[i], **kwargs[i])`` Ray actor per name, with ``resources`` (Ray
        options), bundle ``placement[i]`` and extra Ray ``options[i]`` (a ``runtime_env``) if
        given, restarted by Ray up to ``max_restarts`` times; a call is never retried by Ray
        (``max_task_retries=0``: ``get_supervised`` sends it again). With ``wait`` it returns once
        every actor answers ``ready()`` (``wait_ready``); if one does not, all are killed."""
        self.names = list(names)
        self.actors = self.start_actors(actor_cls, names, args, resources=resources, placement=placement,
                                        kwargs=kwargs, options=options, max_concurrency=max_concurrency)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.shutdown()
                raise
        return self.actors

    def start_actors(self, actor_cls: type, names: list[str], args: list[tuple], *, resources: dict,
                     placement: list[dict] | None = None, kwargs: list[dict] | None = None,
                     options: list[dict] | None = None, max_concurrency: int | None = None) -> list:
        """The actors ``spawn`` starts, without adding them to the group or waiting for them
        (an elastic service admits them once they answer ``ready()``)."""
        import ray

        remote_cls = ray.remote(actor_cls)
        kwargs = [dict(kwargs[i]) if kwargs else {} for i in range(len(names))]
        if _service_log_dir is not None:
            for i, name in enumerate(names):
                kwargs[i]["service_log"] = service_log_path(_service_log_dir, name)
        policy: dict[str, Any] = {"max_restarts": self.max_restarts, "max_task_retries": 0}
        if max_concurrency is not None:
            policy["max_concurrency"] = max_concurrency
        return [
            remote_cls.options(**policy, **placed(resources, placement, i), **(options[i] if options else {}))
            .remote(*args[i], **kwargs[i])
            for i in range(len(names))
        ]

    def wait_ready(self) -> None:
        """Until every actor answers ``ready()``, at most ``start_timeout_s`` in all: a late actor
        is a ``ServiceTimeout`` naming it; one whose ``__init__`` raised re-raises Ray's error
        (it carries the actor's own exception) as soon as it is seen."""
        gather([actor.ready.remote() for actor in self.actors], self.names, "ready (start-up)",
               self.start_timeout_s, "start_timeout_s", name_deaths=False)

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

    def call_supervised(self, indices: Iterable[int], send: Callable[[int], Any], call: str, timeout_s: float,
                        setting: str, refs: list | None = None) -> list:
        """The answers of actors ``indices`` to ``send(index)`` (a remote call), in order, each
        through ``get_supervised`` (a dead or stuck actor is restarted and sent the call again).
        ``refs``: the calls, when they were sent already."""
        indices = list(indices)
        refs = refs if refs is not None else [send(index) for index in indices]
        return [self.get_supervised(index, ref, lambda index=index: send(index), call, timeout_s, setting)
                for index, ref in zip(indices, refs, strict=True)]

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


def gather(refs: list, names: list[str], call: str, timeout_s: float, setting: str, name_deaths: bool = True) -> list:
    """Results of one call fanned out to several actors, in order, waiting at most ``timeout_s``
    for all of them: a ``ServiceTimeout`` names the late actors, a ``ServiceLost`` the first dead
    one as soon as it is seen (the others may be blocked in a collective with it; without
    ``name_deaths``, Ray's own error). For services whose actors are not restarted, such as the
    learner's ranks, and for start-up."""
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
            if not name_deaths:
                raise
            raise ServiceLost(f"{names[refs.index(done[0])]} died during {call} ({type(exc).__name__})") from None
    return ray.get(list(refs))
