"""The reward service on real local Ray: one actor per ensemble member, mean / WCO / UWO
aggregation checked against the members by hand, actor scores equal to the plain class,
bad members failing with their name, Prometheus metrics from every actor."""

from __future__ import annotations

import statistics

import pytest

from services.core import toy_world as tw
from services.core.config import RewardConfig, ScorerConfig
from services.core.errors import UserError
from services.core.service_metrics import merge_expositions
from services.reward.ensemble import RewardEnsemble, RewardService
from services.reward.scorers import ScorerOutputError

pytestmark = pytest.mark.slow

MEMBERS = [ScorerConfig(kind="toy_noisy_gold", noise_std=0.5, seed=s, name=f"noisy-{s}") for s in (1, 2, 3)]
PROMPTS = [r.prompt for r in tw.ListTask().prompts(12, seed=5)] + [r.prompt for r in tw.ArithmeticTask().prompts(4, seed=5)]
COMPLETIONS = [" " + " ".join(tw.ALL_WORDS[i : i + 1 + i % 5]) for i in range(12)] + ["3", "7", "11", "0"]


@pytest.fixture(scope="module")
def service(ray_session):
    svc = RewardService(RewardConfig(scorers=MEMBERS, aggregate="mean", replicas=2))
    yield svc
    svc.shutdown()


def test_one_actor_per_member_per_replica(service, ray_session):
    assert service.member_names == ["noisy-1", "noisy-2", "noisy-3"]
    assert [len(r) for r in service.replicas] == [3, 3]
    ids = {a._actor_id for replica in service.replicas for a in replica}
    assert len(ids) == 6
    pids = ray_session.get([a.__ray_call__.remote(lambda self: __import__("os").getpid()) for a in service.replicas[0]])
    assert len(set(pids)) == 3  # separate processes


def test_actor_member_scores_equal_plain_class(service):
    remote = service.score(PROMPTS, COMPLETIONS)
    local = RewardEnsemble(RewardConfig(scorers=MEMBERS)).score(PROMPTS, COMPLETIONS)
    assert remote.member_names == local.member_names
    assert remote.member_scores == local.member_scores  # bit-identical across processes
    assert remote.scores == pytest.approx(local.scores)
    assert service.score(PROMPTS, COMPLETIONS).member_scores == remote.member_scores  # other replica, same scores
    assert remote.member_scores[0] != remote.member_scores[1]  # seeds differ


@pytest.mark.parametrize("mode", ["mean", "wco", "uwo0", "uwo1"])
def test_aggregation_against_members(service, mode):
    member = service.score(PROMPTS, COMPLETIONS).member_scores  # K x N from the actors
    columns = list(zip(*member))  # N x K
    mean = [statistics.fmean(c) for c in columns]
    std = [statistics.stdev(c) for c in columns]  # by hand: K-1 sample std
    name, lam = {"mean": ("mean", 1.0), "wco": ("wco", 1.0), "uwo0": ("uwo", 0.0), "uwo1": ("uwo", 1.0)}[mode]
    original = service.cfg  # aggregation runs in the caller: switch it without restarting actors
    service.cfg = original.model_copy(update={"aggregate": name, "uwo_lambda": lam})
    try:
        result = service.score(PROMPTS, COMPLETIONS)
    finally:
        service.cfg = original
    assert result.member_scores == member
    assert result.member_std == pytest.approx(std, abs=1e-12)
    if mode == "mean":
        assert result.scores == pytest.approx(mean, abs=1e-12)
    elif mode == "wco":
        assert result.scores == [min(c) for c in columns]
        assert all(min(c) <= m <= max(c) for c, m in zip(columns, mean))  # WCO <= mean <= max
        assert all(w <= m for w, m in zip(result.scores, mean))
    elif mode == "uwo0":
        assert result.scores == pytest.approx(mean, abs=1e-12)
    else:
        assert result.scores == pytest.approx([m - s for m, s in zip(mean, std)], abs=1e-12)
        assert all(s > 0 for s in std)


@pytest.mark.parametrize("fn, pattern", [("nan_at_2", "score at index 2 is not finite: nan"),
                                         ("too_long", "wrong number of scores: expected 16, got 17")])
def test_bad_member_fails_with_its_name(ray_session, tmp_path, fn, pattern):
    path = tmp_path / "bad_rewards.py"
    path.write_text(
        "import math\n"
        "def nan_at_2(prompts, completions, **columns):\n"
        "    return [0.0, 0.0, math.nan] + [0.0] * (len(prompts) - 3)\n"
        "def too_long(prompts, completions, **columns):\n"
        "    return [0.0] * (len(prompts) + 1)\n"
    )
    cfg = RewardConfig(scorers=[MEMBERS[0], ScorerConfig(kind="python", path=f"{path}:{fn}", name="flaky-rm")])
    svc = RewardService(cfg)
    try:
        with pytest.raises(ray_session.exceptions.RayTaskError) as info:
            svc.score(PROMPTS, COMPLETIONS)
        assert f"reward scorer 'flaky-rm': {pattern}" in str(info.value)
        assert isinstance(info.value, ScorerOutputError)  # Ray keeps the cause's type too
        errors = [t for t in svc.metrics_texts() if "/flaky-rm" in t][0]
        assert 'flywheel_errors_total{method="score",replica="0/flaky-rm",service="reward"} 1.0' in errors
    finally:
        svc.shutdown()


def test_bad_path_raises_user_error_before_actors_start(ray_session, tmp_path):
    with pytest.raises(UserError, match=r"reward\.scorers\.1\.path: no python file"):
        RewardService(RewardConfig(scorers=[MEMBERS[0], ScorerConfig(kind="python", path=f"{tmp_path}/no.py:f")]))


def test_metrics_from_every_actor(service):
    from prometheus_client.parser import text_string_to_metric_families

    before = {}
    for text in service.metrics_texts():
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "flywheel_requests_total":
                    before[s.labels["replica"]] = s.value
    service.score(PROMPTS, COMPLETIONS)
    service.score(PROMPTS, COMPLETIONS)  # round-robin: one request to each replica
    texts = service.metrics_texts()
    assert len(texts) == 6
    requests = {}
    for text in texts:
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert {"flywheel_requests", "flywheel_errors", "flywheel_request_seconds"} <= set(families)
        for s in families["flywheel_requests"].samples:
            assert s.name == "flywheel_requests_total"
            assert s.labels["service"] == "reward" and s.labels["method"] == "score"
            requests[s.labels["replica"]] = s.value
    expected = {f"{r}/noisy-{s}" for r in (0, 1) for s in (1, 2, 3)}
    assert set(requests) == expected
    assert all(requests[k] == before.get(k, 0) + 1 for k in expected)
    merged = list(text_string_to_metric_families(merge_expositions(texts)))
    merged_requests = [f for f in merged if f.name == "flywheel_requests"][0]
    assert len(merged_requests.samples) == 6  # distinct series per actor after merging
