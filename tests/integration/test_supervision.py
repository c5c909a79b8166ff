"""Supervision on real local Ray: a reward member, a reference replica and a learner rank are
SIGKILLed (dead) or SIGSTOPped (stuck) in the middle of a call. Reward and reference actors
come back (Ray restarts them) and the call is answered as if nothing happened; a stuck call
past its timeout is a named error; a dead learner rank is a LearnerFailed naming the rank,
raised at once, not after the timeout."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time

import pytest

from services.core.config import LearnerConfig, ReferenceConfig, Resources, RewardConfig, ScorerConfig
from services.core.errors import ServiceTimeout

pytestmark = pytest.mark.slow

PROMPTS = [f"list {2 + i % 4} fruits:" for i in range(8)]
COMPLETIONS = ["apple, pear", "kiwi", "plum, fig, lime", "", "apple", "fig, fig", "pear, plum", "lime"]


@pytest.fixture(scope="module")
def slow_rewards(tmp_path_factory):
    """A reward function that takes ``delay_s`` per batch: slow enough to be caught mid-call."""
    path = tmp_path_factory.mktemp("rewards") / "slow.py"
    path.write_text(textwrap.dedent("""
        import time

        def slow_length(prompts, completions, **columns):
            time.sleep(3.0)
            return [float(len(c)) for c in completions]
    """))
    return f"{path}:slow_length"


def _kill_when_busy(pid: int, delay_s: float, sig=signal.SIGKILL) -> threading.Timer:
    timer = threading.Timer(delay_s, os.kill, (pid, sig))
    timer.start()
    return timer


def _reward_service(slow_rewards, **overrides):
    from services.reward.ensemble import RewardService

    scorers = [ScorerConfig(kind="toy_gold", name="gold"), ScorerConfig(kind="python", path=slow_rewards, name="slow")]
    return RewardService(RewardConfig(scorers=scorers, aggregate="mean", **overrides))


def test_reward_member_killed_mid_batch_is_restarted_and_scores_it_again(ray_session, slow_rewards):
    import ray

    from services.reward.ensemble import RewardEnsemble

    expected = RewardEnsemble(RewardConfig(scorers=[ScorerConfig(kind="toy_gold", name="gold")])).score(PROMPTS, COMPLETIONS)
    with _reward_service(slow_rewards) as service:
        victim = service.actors[1]
        pid = ray.get(victim.process_id.remote())
        started = time.monotonic()
        pending = service.submit(PROMPTS, COMPLETIONS)
        _kill_when_busy(pid, 1.0)  # the member sleeps 3 s per batch: it is mid-call
        scores = pending.result()
        print(f"scoring with a member killed mid-batch took {time.monotonic() - started:.1f}s")
        assert service.restarts == 1
        assert ray.get(victim.process_id.remote()) != pid
        assert scores.member_scores[1] == [float(len(c)) for c in COMPLETIONS]
        assert scores.member_scores[0] == expected.scores


def test_stuck_reward_member_is_restarted_after_the_timeout(ray_session, slow_rewards):
    import ray

    with _reward_service(slow_rewards, timeout_s=6.0) as service:
        pid = ray.get(service.actors[1].process_id.remote())
        pending = service.submit(PROMPTS, COMPLETIONS)
        os.kill(pid, signal.SIGSTOP)  # frozen: answers nothing until it is killed
        try:
            started = time.monotonic()
            scores = pending.result()
            elapsed = time.monotonic() - started
        finally:
            _continue(pid)
        print(f"a frozen member was restarted and scored the batch in {elapsed:.1f}s (reward.timeout_s=6)")
        assert service.restarts == 1
        assert scores.member_scores[1] == [float(len(c)) for c in COMPLETIONS]


def test_stuck_reward_member_without_restarts_is_a_named_timeout(ray_session, slow_rewards):
    import ray

    with _reward_service(slow_rewards, timeout_s=5.0, max_restarts=0) as service:
        pid = ray.get(service.actors[1].process_id.remote())
        pending = service.submit(PROMPTS, COMPLETIONS)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ServiceTimeout) as err:
                pending.result()
            elapsed = time.monotonic() - started
        finally:
            _continue(pid)
        message = str(err.value)
        assert "reward-0/slow" in message and "score" in message and "reward.timeout_s" in message, message
        assert elapsed < 60, elapsed  # the bound is 5 s per member; never a hang
        print(f"named timeout after {elapsed:.1f}s: {message}")


def test_remote_member_that_keeps_failing_fails_the_batch_loudly(ray_session):
    """A reward server that is down: bounded retries, then the scorer's error (no restart, no
    silent zero or None)."""
    import socket

    from ray.exceptions import RayTaskError

    from services.reward.ensemble import RewardService
    from services.reward.scorers import ScorerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    scorer = ScorerConfig(kind="remote", address=f"127.0.0.1:{port}", name="far", retries=2, timeout_s=2)
    with RewardService(RewardConfig(scorers=[scorer])) as service:
        with pytest.raises(RayTaskError) as err:
            service.score(PROMPTS, COMPLETIONS)
        assert isinstance(err.value.cause, ScorerError)
        message = str(err.value.cause)
        assert f"127.0.0.1:{port}" in message and "3 attempts" in message and "far" in message, message
        assert service.restarts == 0


def test_reference_replica_killed_mid_call_answers_the_same(ray_session, tiny_model_dir):
    import ray

    from services.reference.server import ReferencePool

    prompts = [[5, 6, 7, 8]] * 512
    responses = [[9, 10, 11] * 20] * 512
    config = ReferenceConfig(replicas=2, micro_batch_size=1)
    with ReferencePool(str(tiny_model_dir), config) as pool:
        started = time.monotonic()
        expected = pool.logprobs(prompts, responses)
        call_s = time.monotonic() - started
        pid = ray.get(pool.actors[1].process_id.remote())
        out = []
        worker = threading.Thread(target=lambda: out.append(pool.logprobs(prompts, responses)))
        worker.start()
        time.sleep(call_s / 3)  # a third of the way through the call
        os.kill(pid, signal.SIGKILL)
        worker.join(timeout=300)
        assert out, "logprobs did not come back after the kill"
        print(f"reference call: {call_s:.1f}s normally, {time.monotonic() - started - call_s:.1f}s with a replica killed")
        assert pool.restarts == 1
        assert out[0] == expected


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # killed by the restart: nothing left to resume
        pass


@pytest.fixture()
def two_ranks(ray_session, tiny_model_dir):
    from services.learner.group import LearnerGroup

    config = LearnerConfig(num_ranks=2, micro_batch_size=4, warmup_steps=0, resources=Resources(num_cpus=0),
                           step_timeout_s=20)
    group = LearnerGroup(str(tiny_model_dir), config)
    yield group
    group.shutdown()


def _batch():
    import torch

    from services.core.batch_types import pack_sequences
    from services.core.learner_batches import PolicyBatch

    tokens = pack_sequences([[5, 6, 7]] * 8, [[8, 9, 10, 11] * 6] * 8, pad_id=1)
    return PolicyBatch(tokens=tokens, old_logprobs=torch.zeros(tokens.input_ids.shape),
                       advantages=torch.ones(tokens.input_ids.shape) * tokens.response_mask)


def test_dead_learner_rank_is_named_at_once(two_ranks):
    import ray

    from services.learner.group import LearnerFailed
    from tests.loss_specs import loss_spec

    two_ranks.train_step(_batch(), loss_spec("ppo"))  # both ranks up
    pid = ray.get(two_ranks.actors[1].process_id.remote())
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(LearnerFailed) as err:
        two_ranks.train_step(_batch(), loss_spec("ppo"))
    elapsed = time.monotonic() - started
    print(f"dead rank reported after {elapsed:.1f}s: {err.value}")
    assert "learner rank 1" in str(err.value) and "train_step" in str(err.value)
    assert "died" in str(err.value)


def test_stuck_learner_rank_is_a_named_timeout(two_ranks):
    import ray

    from services.learner.group import LearnerFailed
    from tests.loss_specs import loss_spec

    pid = ray.get(two_ranks.actors[1].process_id.remote())
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(LearnerFailed) as err:
            two_ranks.train_step(_batch(), loss_spec("ppo"))
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGKILL)
    message = str(err.value)
    print(f"stuck rank reported after {elapsed:.1f}s: {message}")
    assert "learner rank 1" in message and "train_step" in message and "learner.step_timeout_s" in message
    assert "learner rank 0" in message  # blocked in the collective with rank 1: late as well
    assert elapsed < 120, elapsed  # the bound is 20 s; never a hang


def test_gpu_weight_transfer_control_plane_names_the_late_worker(ray_session):
    import ray

    from services.rollout.nccl_client import PoolWeightSyncClient
    from services.rollout.weight_sync import WeightSyncTimeout

    class Engine:  # defined here so Ray ships it by value (workers cannot import tests/)
        """A rollout worker's side of the GPU handshake: only the control plane (fan-out,
        bound, naming) is exercised here; NCCL itself needs a GPU."""

        def __init__(self, delay_s: float):
            self.delay_s = delay_s

        def nccl_step(self, step, info=None, version=None):
            time.sleep(self.delay_s)
            return 0

    engine = ray.remote(num_cpus=0)(Engine)
    workers = [engine.remote(0.0), engine.remote(60.0)]
    try:
        client = PoolWeightSyncClient(workers, ["rollout-0", "rollout-1"], timeout_s=3)
        started = time.monotonic()
        with pytest.raises(WeightSyncTimeout) as err:
            client.start_weight_update()
        elapsed = time.monotonic() - started
        message = str(err.value)
        assert message.startswith("rollout-1: weight transfer 'start'") and "rollout.sync_timeout_s" in message, message
        assert elapsed < 30, elapsed  # the bound is 3 s
    finally:
        for w in workers:
            ray.kill(w)
