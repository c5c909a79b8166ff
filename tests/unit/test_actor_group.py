"""The actor base (ServiceActor) and the actor group (ActorGroup) without a running Ray: state
per instance, the boilerplate every service actor shares, and how ``spawn`` starts actors
(Ray's ``remote`` / ``wait`` / ``get`` / ``kill`` are replaced by fakes here; the real thing
runs in tests/integration)."""

from __future__ import annotations

import os

import pytest

from services.core.actor_group import (
    ActorGroup, ServiceActor, gather, send_service_logs_to, takes_all_cores, use_cpu_threads,
)
from services.core.config import Resources
from services.core.errors import ServiceTimeout
from services.core.service_metrics import ServiceMetrics


def test_two_groups_do_not_share_state():
    mutable = {name: value for name, value in vars(ActorGroup).items()
               if isinstance(value, (list, dict, set, frozenset))}
    assert not mutable, f"class attributes every instance would share: {sorted(mutable)}"
    a, b = ActorGroup(max_restarts=2, restarts_setting="rollout.max_restarts"), ActorGroup()
    a.names.append("rollout-0")
    a.actors.append(object())
    a.restarts += 1
    a._pids = {0: 123}
    a._recovering = a._recovering | {0}
    assert (b.names, b.actors, b.restarts, b._pids, b._recovering) == ([], [], 0, None, frozenset())
    assert (b.max_restarts, b.restarts_setting, b.start_timeout_s) == (0, "max_restarts", 600.0)
    assert a.name(0) == "rollout-0" and a.name(3) == "actor-3"


def test_a_group_without_restarts_raises_the_problem_itself():
    group = ActorGroup()
    problem = ServiceTimeout("learner rank 1", "train_step", 20, "learner.step_timeout_s")
    with pytest.raises(ServiceTimeout) as err:
        group.restart(1, problem, kill=True)
    assert err.value is problem and group.restarts == 0


class Toy(ServiceActor):
    def __init__(self, index: int, fail: bool = False):
        if fail:
            raise RuntimeError("model load failed")
        self.name = f"toy-{index}"
        self.metrics = ServiceMetrics(service="toy", replica=index)


@pytest.fixture
def torch_threads():
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


def test_cpu_threads_of_a_service_actor(torch_threads):
    cores = len(os.sched_getaffinity(0))
    assert use_cpu_threads(Resources()) == cores == torch_threads.get_num_threads()  # not Ray's one thread
    assert use_cpu_threads(Resources(), share=cores) == 1  # as many ranks as cores: one each
    assert use_cpu_threads(Resources(num_cpus=1.5)) == 1 == torch_threads.get_num_threads()
    assert use_cpu_threads(Resources(num_cpus=0.5, cpu_threads=3)) == 3 == torch_threads.get_num_threads()
    assert takes_all_cores(Resources()) and takes_all_cores(Resources(num_cpus=0.5))
    assert not takes_all_cores(Resources(num_cpus=1)) and not takes_all_cores(Resources(cpu_threads=1))
    assert not takes_all_cores(Resources(num_gpus=1))


def test_service_actor_repr_before_and_after_init():
    assert repr(Toy.__new__(Toy)) == "Toy(?)"  # Ray may ask before __init__ has set the name
    half = Toy.__new__(Toy)
    with pytest.raises(RuntimeError):
        half.__init__(1, fail=True)
    assert repr(half) == "Toy(?)"
    assert repr(Toy(2)) == "Toy(toy-2)"


def test_service_actor_answers_what_groups_ask():
    actor = Toy(3)
    assert actor.ready() == "toy-3"
    assert actor.process_id() == os.getpid()
    assert 'flywheel_policy_version{replica="3",service="toy"} 0.0' in actor.metrics_text()


def test_every_service_actor_uses_the_base():
    from services.learner.group import LearnerRank
    from services.reference.server import ReferenceServer
    from services.reward.ensemble import ScorerActor
    from services.rollout.worker import RolloutWorkerActor

    shared = {"ready", "process_id", "metrics_text", "__repr__"}
    for cls in (RolloutWorkerActor, ScorerActor, ReferenceServer, LearnerRank):
        assert issubclass(cls, ServiceActor), cls
        assert repr(cls.__new__(cls)) == f"{cls.__name__}(?)"
        own = {name for klass in cls.__mro__ if klass not in (ServiceActor, object) for name in vars(klass)}
        assert not own & shared, f"{cls.__name__} writes its own {sorted(own & shared)}"


class FakeRay:
    """``ray.remote(cls).options(**o).remote(*a, **k)`` records what it was given; ``ready``
    answers at once unless the actor's index is in ``late`` or ``dead``."""

    def __init__(self, late=(), dead=()):
        self.started: list[dict] = []
        self.killed: list = []
        self.late, self.dead = set(late), set(dead)

    def remote(self, cls):
        fake = self

        class Handle:
            def __init__(self, index):
                self.index = index
                self.ready = self

            def remote(self):  # actor.ready.remote()
                return ("ready", self.index)

        class Options:
            def __init__(self, options):
                self.options_given = options

            def remote(self, *args, **kwargs):
                fake.started.append({"cls": cls, "options": self.options_given, "args": args, "kwargs": kwargs})
                return Handle(len(fake.started) - 1)

        class Remote:
            def options(self, **options):
                return Options(options)

        return Remote()

    def wait(self, refs, num_returns, timeout):
        done = [r for r in refs if r[1] not in self.late][:num_returns]
        return done, [r for r in refs if r not in done]

    def get(self, ref, timeout=None):
        from ray.exceptions import ActorDiedError

        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        if ref[1] in self.dead:
            raise ActorDiedError()
        return ref[1]

    def kill(self, actor, no_restart=True):
        self.killed.append(actor.index)


@pytest.fixture()
def fake_ray(monkeypatch):
    import ray

    def install(**kwargs):
        fake = FakeRay(**kwargs)
        for name in ("remote", "wait", "get", "kill"):
            monkeypatch.setattr(ray, name, getattr(fake, name))
        return fake

    return install


def test_spawn_gives_every_actor_its_options_and_waits_until_ready(fake_ray):
    fake = fake_ray()
    group = ActorGroup(max_restarts=3, restarts_setting="rollout.max_restarts")
    placement = [{"scheduling_strategy": f"bundle-{i}"} for i in range(2)]
    actors = group.spawn(Toy, ["toy-0", "toy-1"], [(0,), (1,)], resources={"num_cpus": 0}, placement=placement,
                         kwargs=[{"fail": False}] * 2, options=[{}, {"runtime_env": {"env_vars": {"T": "x"}}}],
                         max_concurrency=2)
    assert actors == group.actors and group.names == ["toy-0", "toy-1"]
    assert [s["options"] for s in fake.started] == [
        {"max_restarts": 3, "max_task_retries": 0, "max_concurrency": 2, "num_cpus": 0, "scheduling_strategy": "bundle-0"},
        {"max_restarts": 3, "max_task_retries": 0, "max_concurrency": 2, "num_cpus": 0, "scheduling_strategy": "bundle-1",
         "runtime_env": {"env_vars": {"T": "x"}}},
    ]
    assert [(s["cls"], s["args"], s["kwargs"]) for s in fake.started] == [(Toy, (i,), {"fail": False}) for i in (0, 1)]
    assert not fake.killed


def test_spawn_names_the_actor_that_did_not_come_up_and_kills_all(fake_ray):
    fake = fake_ray(late={1})
    group = ActorGroup(start_timeout_s=5)
    with pytest.raises(ServiceTimeout) as err:
        group.spawn(Toy, ["toy-0", "toy-1", "toy-2"], [(0,), (1,), (2,)], resources={})
    assert str(err.value) == "toy-1: ready (start-up) returned nothing within 5s (start_timeout_s)"
    assert fake.killed == [0, 1, 2] and group.actors == []
    assert [s["options"] for s in fake.started][0] == {"max_restarts": 0, "max_task_retries": 0}


def test_spawn_passes_on_the_error_of_an_actor_that_failed_to_start(fake_ray):
    from ray.exceptions import ActorDiedError

    fake = fake_ray(dead={0})
    with pytest.raises(ActorDiedError):  # Ray's own error: it carries the exception __init__ raised
        ActorGroup().spawn(Toy, ["toy-0", "toy-1"], [(0,), (1,)], resources={})
    assert fake.killed == [0, 1]


def test_spawn_without_wait_leaves_start_up_to_the_group(fake_ray):
    fake = fake_ray(late={0, 1})
    group = ActorGroup()
    group.spawn(Toy, ["learner rank 0", "learner rank 1"], [(0,), (1,)], resources={}, wait=False)
    assert len(group.actors) == 2 and not fake.killed


def test_gather_names_a_dead_actor(fake_ray):
    from services.core.errors import ServiceLost

    fake_ray(dead={1})
    with pytest.raises(ServiceLost, match=r"^rank-1 died during start \(ActorDiedError\)$"):
        gather([("ready", 0), ("ready", 1)], ["rank-0", "rank-1"], "start", 5, "learner.step_timeout_s")


def test_spawn_sends_each_actors_output_to_its_own_log_file(fake_ray, tmp_path):
    fake = fake_ray()
    send_service_logs_to(tmp_path / "logs")
    try:
        ActorGroup().spawn(Toy, ["learner rank 0", "reward-0/rm-1"], [(0,), (1,)], resources={},
                           kwargs=[{"fail": False}] * 2)
    finally:
        send_service_logs_to(None)
    assert [s["kwargs"] for s in fake.started] == [
        {"fail": False, "service_log": str(tmp_path / "logs" / "learner-rank-0.log")},
        {"fail": False, "service_log": str(tmp_path / "logs" / "reward-0-rm-1.log")},
    ]
    ActorGroup().spawn(Toy, ["toy-0"], [(0,)], resources={})  # by default Ray keeps the output
    assert fake.started[-1]["kwargs"] == {}


LOGGED_ACTOR = """
import os, sys
from services.core.actor_group import ServiceActor

class Loud(ServiceActor):
    def __init__(self, word):
        print("python stdout", word)
        print("python stderr", word, file=sys.stderr)
        os.write(2, b"fd 2 (C++ and child processes)\\n")
        self.name = word

class Louder(Loud):
    def __init__(self, word):
        super().__init__(word)
        print("subclass", flush=True)

class Plain:  # a service class of its own, as RolloutWorker
    def __init__(self, word):
        print("plain", word)
        self.name = word

class Inherits(ServiceActor, Plain):  # no __init__ of its own
    pass

Loud("first", service_log=sys.argv[1])
Louder("again", service_log=sys.argv[1])  # a restarted actor appends
Loud("no file")
Inherits("inherited", service_log=sys.argv[1])
"""


def test_a_service_actor_given_a_log_file_writes_all_its_output_there(tmp_path):
    import inspect
    import subprocess
    import sys

    log = tmp_path / "logs" / "rollout-0.log"
    proc = subprocess.run([sys.executable, "-c", LOGGED_ACTOR, str(log)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == proc.stderr == ""  # the process's own streams: everything went to the file
    lines = log.read_text().splitlines()
    assert sorted(lines) == sorted(["python stdout first", "python stderr first", "fd 2 (C++ and child processes)",
                                    "python stdout again", "python stderr again", "fd 2 (C++ and child processes)",
                                    "subclass", "python stdout no file", "python stderr no file",
                                    "fd 2 (C++ and child processes)", "plain inherited"])
    # Ray checks the arguments of an actor's construction against this signature
    assert "service_log" in inspect.signature(Toy.__init__).parameters


def test_an_actor_that_cannot_write_its_log_file_keeps_its_output_and_says_why(tmp_path, capsys):
    from services.core.actor_group import write_output_to

    (tmp_path / "a-file").write_text("")
    assert write_output_to(str(tmp_path / "a-file" / "logs" / "rollout-0.log")) is False
    assert "cannot write this actor's output to" in capsys.readouterr().err
