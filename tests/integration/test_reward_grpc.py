"""The gRPC reward server and client on real loopback sockets: scores over the wire equal the
in-process ensemble (also through RewardService on Ray with remote members), bearer-token
checks, message-size limits on both sides, bounded retries against a dead address, error
mapping, and `flywheel serve-reward` as a subprocess."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import yaml

from services.core import toy_world as tw
from services.core.config import RewardConfig, RewardServerConfig, ScorerConfig
from services.core.errors import UserError
from services.reward.ensemble import RewardEnsemble, RewardService
from services.reward.grpc_client import RemoteRewardError, RewardClient
from services.reward.grpc_server import serve_reward
from services.reward.scorers import RemoteScorer, build_scorer
from services.rpc.generated.flywheel.reward.v1 import reward_pb2, reward_pb2_grpc
from services.rpc.struct_columns import dict_to_struct
from tests.conftest import REPO, run_flywheel
from tests.unit.test_reward_scorers import save_tiny_reward_model

REWARD_FNS = '''
import math
import time

def exact(prompts, completions, answer=None, **_):
    answer = answer or [None] * len(prompts)
    return [float(a is not None and c.strip() == a) for c, a in zip(completions, answer)]

def weight_echo(prompts, completions, weight=None, **_):
    weight = weight or [None] * len(prompts)
    return [-1.0 if w is None else float(w) for w in weight]

def guarded(prompts, completions, **_):
    if "CRASH" in completions:
        raise RuntimeError("scorer crashed on purpose")
    return [math.nan if c == "POISON" else 0.0 for c in completions]

def slow(prompts, completions, **_):
    time.sleep(1.5)
    return [0.0] * len(prompts)
'''
TOKEN_ENV = "FLYWHEEL_TEST_REWARD_TOKEN"
TOKEN = "t0ken-for-tests-only"
LIST_ROWS = tw.ListTask().prompts(6, seed=9)
MATH_ROWS = tw.ArithmeticTask().prompts(4, seed=9)
PROMPTS = [r.prompt for r in LIST_ROWS] + [r.prompt for r in MATH_ROWS]
COMPLETIONS = [" " + " ".join(tw.ALL_WORDS[i : i + 1 + i % 4]) for i in range(6)] + ["7", "12", "3", "0"]
# the python member compares completions with `answer`: some right, some wrong, some without one
COLUMNS = {
    "answer": [None] * 6 + [COMPLETIONS[6], "99", COMPLETIONS[8], "-1"],
    "weight": [0.5, None, 2, None, 1.25, None, 3, None, -1, None],
}


@pytest.fixture(scope="module")
def fns_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reward-fns") / "grpc_rewards.py"
    path.write_text(REWARD_FNS)
    return path


@pytest.fixture(scope="module")
def members(fns_file, tmp_path_factory) -> list[ScorerConfig]:
    rm_dir = tmp_path_factory.mktemp("tiny-rm")
    save_tiny_reward_model(rm_dir)
    return [
        ScorerConfig(kind="toy_noisy_gold", noise_std=0.5, seed=1, name="noisy-1"),
        ScorerConfig(kind="toy_noisy_gold", noise_std=0.5, seed=2, name="noisy-2"),
        ScorerConfig(kind="python", path=f"{fns_file}:exact", name="exact"),
        ScorerConfig(kind="python", path=f"{fns_file}:weight_echo", name="weight-echo"),
        ScorerConfig(kind="hf", path=str(rm_dir), name="tiny-rm"),
    ]


def reward_cfg(scorers, aggregate="uwo", **server) -> RewardConfig:
    server = {"host": "127.0.0.1", "port": 0, "token_env": None, **server}
    return RewardConfig(scorers=scorers, aggregate=aggregate, uwo_lambda=0.5, server=RewardServerConfig(**server))


def start(cfg: RewardConfig, ensemble: RewardEnsemble | None = None, token: str | None = None):
    """serve_reward with the token in the environment only while it starts (it reads it once)."""
    with pytest.MonkeyPatch.context() as mp:
        if token is not None:
            mp.setenv(cfg.server.token_env, token)
        return serve_reward(cfg, ensemble)


@pytest.fixture(scope="module")
def ensemble(members) -> RewardEnsemble:
    return RewardEnsemble(reward_cfg(members))


@pytest.fixture(scope="module")
def open_server(ensemble):
    """The full ensemble, no token (loopback)."""
    server, port = serve_reward(ensemble.cfg, ensemble)
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def token_server():
    server, port = start(reward_cfg([ScorerConfig(name="gold")], "mean", token_env=TOKEN_ENV), token=TOKEN)
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def server_of(fns_file):
    """Start small servers for one test; stopped afterwards."""
    servers = []

    def make(fn: str, **server) -> str:
        cfg = reward_cfg([ScorerConfig(name="gold"), ScorerConfig(kind="python", path=f"{fns_file}:{fn}", name=fn)],
                         "mean", **server)
        srv, port = serve_reward(cfg)
        servers.append(srv)
        return f"127.0.0.1:{port}"

    yield make
    for srv in servers:
        srv.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- scores over the wire ----------------------------------------------------------------------


def test_scores_over_the_wire_equal_in_process(open_server, ensemble):
    direct = ensemble.score(PROMPTS, COMPLETIONS, COLUMNS)
    with RewardClient(open_server, timeout_s=30, retries=0) as client:
        remote = client.score(PROMPTS, COMPLETIONS, COLUMNS)
    assert remote.member_names == ["noisy-1", "noisy-2", "exact", "weight-echo", "tiny-rm"]
    assert remote.member_names == direct.member_names
    assert remote.member_scores == direct.member_scores  # doubles survive the wire bit for bit
    assert remote.member_std == direct.member_std
    assert remote.scores == direct.scores
    assert (remote.aggregate_mode, remote.api_version) == ("uwo", "v1")
    assert remote.member_scores[0] != remote.member_scores[1]  # the seeds differ
    assert len(set(remote.member_scores[4])) > 1  # the hf member is not a constant
    # the columns reached the python members through Struct metadata
    assert remote.member_scores[2] == [0.0] * 6 + [1.0, 0.0, 1.0, 0.0]
    assert remote.member_scores[3] == [0.5, -1.0, 2.0, -1.0, 1.25, -1.0, 3.0, -1.0, -1.0, -1.0]
    assert remote.summary() == direct.summary()


def test_missing_metadata_key_reaches_scorers_as_none(open_server, ensemble):
    """Samples with different metadata keys: each key becomes a column, None where absent."""
    samples = [
        reward_pb2.Sample(prompt=PROMPTS[6], completion=COMPLETIONS[6], metadata=dict_to_struct({"answer": COMPLETIONS[6]})),
        reward_pb2.Sample(prompt=PROMPTS[7], completion=COMPLETIONS[7], metadata=dict_to_struct({"weight": 4})),
        reward_pb2.Sample(prompt=PROMPTS[8], completion=COMPLETIONS[8]),
    ]
    with grpc.insecure_channel(open_server) as channel:
        response = reward_pb2_grpc.RewardServiceStub(channel).Score(
            reward_pb2.ScoreRequest(samples=samples, request_id="mixed-keys"), timeout=30
        )
    by_name = {m.name: list(m.scores) for m in response.members}
    assert by_name["exact"] == [1.0, 0.0, 0.0]
    assert by_name["weight-echo"] == [-1.0, 4.0, -1.0]
    direct = ensemble.score(PROMPTS[6:9], COMPLETIONS[6:9], {"answer": [COMPLETIONS[6], None, None], "weight": [None, 4, None]})
    assert list(response.aggregate) == direct.scores


def test_health(open_server, token_server):
    health = RewardClient(open_server, timeout_s=10, retries=0).health()
    assert health.status == reward_pb2.HealthResponse.SERVING
    assert list(health.member_names) == ["noisy-1", "noisy-2", "exact", "weight-echo", "tiny-rm"]
    assert (health.aggregate_mode, health.api_version) == ("uwo", "v1")
    assert list(RewardClient(token_server, 10, 0, token=TOKEN).health().member_names) == ["gold"]
    with pytest.raises(RemoteRewardError, match="missing bearer token"):
        RewardClient(token_server, 10, 0).health()


def test_remote_scorer_aggregate_member_and_unknown_member(open_server, ensemble):
    direct = ensemble.score(PROMPTS, COMPLETIONS, COLUMNS)
    aggregate = build_scorer(ScorerConfig(kind="remote", address=open_server, name="rm"), 0)
    assert isinstance(aggregate, RemoteScorer)
    assert aggregate.score(PROMPTS, COMPLETIONS, COLUMNS) == direct.scores
    member = build_scorer(ScorerConfig(kind="remote", address=open_server, member="noisy-2"), 1)
    assert member.score(PROMPTS, COMPLETIONS, COLUMNS) == direct.member_scores[1]
    unknown = build_scorer(ScorerConfig(kind="remote", address=open_server, member="nope"), 2)
    with pytest.raises(UserError, match=r"reward\.scorers\.2\.member: the reward server at 127\.0\.0\.1:\d+ has no "
                                        r"member 'nope'; its members: noisy-1, noisy-2, exact, weight-echo, tiny-rm"):
        unknown.score(PROMPTS, COMPLETIONS)


@pytest.mark.slow
def test_ray_reward_service_with_remote_members_matches_in_process(ray_session, open_server, members):
    """RewardService actors (other processes) score through the loopback server: per member
    (aggregated on this side) and through the server's own aggregate."""
    local = RewardEnsemble(reward_cfg(members)).score(PROMPTS, COMPLETIONS, COLUMNS)  # freshly built members
    per_member = reward_cfg(
        [ScorerConfig(kind="remote", address=open_server, member=m.name, name=f"remote-{m.name}") for m in members]
    )
    service = RewardService(per_member)
    try:
        remote = service.score(PROMPTS, COMPLETIONS, COLUMNS, timeout=120)
    finally:
        service.shutdown()
    assert remote.member_names == [f"remote-{m.name}" for m in members]
    assert remote.member_scores[:4] == local.member_scores[:4]
    assert remote.member_scores[4] == pytest.approx(local.member_scores[4], abs=1e-6)  # hf: same model, reloaded
    assert remote.member_std == pytest.approx(local.member_std, abs=1e-6)
    assert remote.scores == pytest.approx(local.scores, abs=1e-6)

    service = RewardService(RewardConfig(scorers=[ScorerConfig(kind="remote", address=open_server, name="remote")]))
    try:
        through_server = service.score(PROMPTS, COMPLETIONS, COLUMNS, timeout=120)
    finally:
        service.shutdown()
    assert through_server.scores == pytest.approx(local.scores, abs=1e-6)


def test_ray_scorer_actor_gets_the_token_from_the_driver_env(token_server, ray_session, monkeypatch):
    """Ray actors do not see env vars set after ray.init: RewardService hands the token over."""
    scorer = ScorerConfig(kind="remote", address=token_server, name="remote-gold", token_env=TOKEN_ENV)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(UserError, match=f"{TOKEN_ENV}.*not set"):
        RewardService(RewardConfig(scorers=[scorer]))  # refused before any actor starts
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    service = RewardService(RewardConfig(scorers=[scorer]))
    try:
        scored = service.score(["12+7=", "12+7="], ["19", "18"], timeout=120)
    finally:
        service.shutdown()
    assert scored.scores == [1.0, 0.0]


# --- authentication ----------------------------------------------------------------------------


def test_wrong_and_missing_token_are_unauthenticated(token_server):
    wrong = RewardClient(token_server, timeout_s=10, retries=3, token="not-the-token", token_env="MY_RM_TOKEN")
    with pytest.raises(RemoteRewardError) as info:
        wrong.score(["12+7="], ["19"])
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    message = str(info.value)
    assert "wrong bearer token" in message and "MY_RM_TOKEN" in message and token_server in message
    assert TOKEN not in message and "not-the-token" not in message
    assert wrong.last_attempts == 1  # not retried

    missing = RewardClient(token_server, timeout_s=10, retries=3)
    with pytest.raises(RemoteRewardError, match=r"missing bearer token.*the client sends no token: set token_env") as info:
        missing.score(["12+7="], ["19"])
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and missing.last_attempts == 1

    right = RewardClient(token_server, timeout_s=10, retries=0, token=TOKEN)
    assert right.score(["12+7=", "12+7="], ["19", "18"]).scores == [1.0, 0.0]


def test_remote_scorer_reads_token_from_env(token_server, monkeypatch):
    cfg = ScorerConfig(kind="remote", address=token_server, token_env="FLYWHEEL_TEST_CLIENT_TOKEN", retries=0)
    monkeypatch.setenv("FLYWHEEL_TEST_CLIENT_TOKEN", TOKEN)
    assert build_scorer(cfg, 0).score(["3-1="], ["2"]) == [1.0]
    monkeypatch.setenv("FLYWHEEL_TEST_CLIENT_TOKEN", "stale")
    with pytest.raises(RemoteRewardError, match="wrong bearer token.*FLYWHEEL_TEST_CLIENT_TOKEN"):
        build_scorer(cfg, 0).score(["3-1="], ["2"])


def test_non_loopback_host_needs_a_token(monkeypatch):
    monkeypatch.delenv("FLYWHEEL_TEST_UNSET_TOKEN", raising=False)
    exposed = reward_cfg([ScorerConfig()], "mean", host="0.0.0.0", token_env="FLYWHEEL_TEST_UNSET_TOKEN")
    with pytest.raises(UserError, match=r"reward\.server\.host: refusing to serve on non-loopback host '0\.0\.0\.0' "
                                        r"without a bearer token: set the environment variable FLYWHEEL_TEST_UNSET_TOKEN"):
        serve_reward(exposed)
    with pytest.raises(UserError, match="set reward.server.token_env"):
        serve_reward(reward_cfg([ScorerConfig()], "mean", host="0.0.0.0"))
    server, port = serve_reward(exposed.model_copy(update={"server": exposed.server.model_copy(
        update={"allow_unauthenticated": True})}))
    try:
        assert RewardClient(f"127.0.0.1:{port}", 10, 0).score(["3-1="], ["2"]).scores == [1.0]
    finally:
        server.stop(0)
    server, port = start(exposed, token="abc")  # with a token it may bind every interface
    try:
        with pytest.raises(RemoteRewardError, match="missing bearer token"):
            RewardClient(f"127.0.0.1:{port}", 10, 0).health()
        assert RewardClient(f"127.0.0.1:{port}", 10, 0, token="abc").health().status == reward_pb2.HealthResponse.SERVING
    finally:
        server.stop(0)


# --- limits, retries and errors ----------------------------------------------------------------


def test_oversized_request_is_refused_by_the_client_before_sending(open_server):
    client = RewardClient(open_server, timeout_s=10, retries=2, max_message_mb=0.01)
    with pytest.raises(RemoteRewardError) as info:
        client.score(["12+7="] * 2, ["x" * 8000] * 2)
    message = str(info.value)
    assert re.search(r"is 0\.02 MiB \(\d+ bytes\) for 2 samples, over the client's limit of 0\.01 MiB \(10485 bytes\)", message)
    assert "reward.scorers.N.max_message_mb" in message and "reward.server.max_message_mb" in message
    assert client.last_attempts == 0  # never sent
    assert client.score(["12+7="], ["19"]).scores  # a small batch still goes through


def test_oversized_request_is_refused_by_the_server(server_of):
    address = server_of("exact", max_message_mb=0.05)  # 52428 bytes on the server, 16 MiB on the client
    client = RewardClient(address, timeout_s=10, retries=2)
    with pytest.raises(RemoteRewardError) as info:
        client.score(["12+7="], ["x" * 100_000])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = str(info.value)
    assert "RESOURCE_EXHAUSTED" in message and "reward.server.max_message_mb" in message
    assert re.search(r"the request is 0\.10 MiB \(1000\d\d bytes\)", message)
    assert "max_message_mb of the remote scorer" in message and address in message
    assert client.last_attempts == 1


def test_dead_server_is_retried_a_bounded_number_of_times():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    for retries in (0, 3):
        slept: list[float] = []
        client = RewardClient(address, timeout_s=5, retries=retries, sleep=slept.append)
        with pytest.raises(RemoteRewardError) as info:
            client.score(["12+7="], ["19"])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert client.last_attempts == retries + 1 and len(slept) == retries
        assert f"reward server at {address} is unavailable: Score failed after {retries + 1} attempts" in str(info.value)
        assert "last status UNAVAILABLE" in str(info.value)


def test_deadline_is_per_attempt_and_not_retried(server_of):
    address = server_of("slow")
    client = RewardClient(address, timeout_s=0.3, retries=3)
    with pytest.raises(RemoteRewardError, match=rf"reward server at {address} did not answer Score within the "
                                                r"deadline of 0\.3 s \(timeout_s\)") as info:
        client.score(["12+7="], ["19"])
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and client.last_attempts == 1


def test_scorer_errors_map_to_status_codes(server_of):
    client = RewardClient(server_of("guarded"), timeout_s=10, retries=2)
    with pytest.raises(RemoteRewardError, match=r"INVALID_ARGUMENT: reward scorer 'guarded': score at index 1 is "
                                                r"not finite: nan") as info:
        client.score(["12+7=", "3-1="], ["19", "POISON"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and client.last_attempts == 1
    with pytest.raises(RemoteRewardError, match=r"INTERNAL: RuntimeError: scorer crashed on purpose") as info:
        client.score(["12+7="], ["CRASH"])
    assert info.value.code == grpc.StatusCode.INTERNAL
    with pytest.raises(RemoteRewardError, match=r"INVALID_ARGUMENT: not an arithmetic prompt: 'hello'"):
        client.score(["hello"], ["19"])  # a scorer's ValueError on bad input
    with pytest.raises(ValueError, match=r"column 'blob': a bytes cannot be sent"):
        client.score(["a"], ["b"], {"blob": [b"\x00"]})  # refused before sending
    assert client.score(["12+7="], ["19"]).member_scores == [[1.0], [0.0]]  # the server is still fine


# --- flywheel serve-reward ---------------------------------------------------------------------


def read_line(lines: queue.Queue, timeout: float) -> str:
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no output within {timeout} s") from None


@pytest.mark.slow
def test_serve_reward_cli_subprocess(tmp_path, fns_file):
    reward = {
        "scorers": [
            {"kind": "toy_noisy_gold", "noise_std": 0.5, "seed": 1, "name": "noisy-1"},
            {"kind": "toy_noisy_gold", "noise_std": 0.5, "seed": 2, "name": "noisy-2"},
            {"kind": "python", "path": f"{fns_file}:exact", "name": "exact"},
        ],
        "aggregate": "wco",
        "server": {"token_env": "FLYWHEEL_TEST_CLI_TOKEN"},
    }
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"reward": reward}))
    env = {**os.environ, "FLYWHEEL_TEST_CLI_TOKEN": TOKEN}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve-reward", str(config), "--port", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        first = read_line(lines, 120)
        match = re.fullmatch(r"serving reward ensemble noisy-1, noisy-2, exact \(wco\) on 127\.0\.0\.1:(\d+)\n", first)
        assert match, first
        address = f"127.0.0.1:{match.group(1)}"
        remote = RewardClient(address, timeout_s=30, retries=2, token=TOKEN).score(PROMPTS, COMPLETIONS, COLUMNS)
        local = RewardEnsemble(RewardConfig(**reward)).score(PROMPTS, COMPLETIONS, COLUMNS)
        assert remote.member_scores == local.member_scores and remote.scores == local.scores
        assert remote.aggregate_mode == "wco"
        with pytest.raises(RemoteRewardError, match="wrong bearer token"):
            RewardClient(address, timeout_s=10, retries=0, token="guess").health()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert "stopping reward server" in read_line(lines, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_reward_cli_refuses_exposed_host_and_bad_port(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"reward": {"server": {"token_env": "FLYWHEEL_TEST_UNSET_TOKEN"}}}))
    res = run_flywheel("serve-reward", str(config), "--host", "0.0.0.0", timeout=120)
    assert res.returncode == 2, res.stderr
    assert "refusing to serve on non-loopback host '0.0.0.0'" in res.stderr and "Traceback" not in res.stderr
    res = run_flywheel("serve-reward", str(config), "--port", "70000", timeout=120)
    assert res.returncode == 2 and "--port: Input should be less than or equal to 65535" in res.stderr, res.stderr
