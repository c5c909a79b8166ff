"""The driver's Prometheus exporter: a real HTTP server on a loopback port, scraped with urllib."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.core.service_metrics import ServiceMetrics
from services.driver.exporter import MetricsExporter, RunMetrics

RECORDS = [
    {"step": 1, "policy_version": 1, "reward/mean": 0.25, "reward/std": 0.5, "gold/mean": 0.1, "train/kl": 0.02,
     "rollout/response_length_mean": 12.0, "timing/step_s": 2.0, "timing/rollout_s": 1.2, "timing/train_s": 0.6,
     "timing/sync_s": 0.05, "rollout/trajectories": 16, "rollout/dropped_stale": 0},
    # missing keys (gold, sync) and a NaN are ignored: the previous values stay
    {"step": 2, "policy_version": 2, "reward/mean": 0.5, "reward/std": 0.25, "train/kl": float("nan"),
     "rollout/response_length_mean": 14.0, "timing/step_s": 40.0, "timing/rollout_s": 1.0, "timing/train_s": 0.5,
     "rollout/trajectories": 16, "rollout/dropped_stale": 3},
]


def scrape(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode(), resp.headers["Content-Type"]


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} of a scrape."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def run_metrics():
    rm = RunMetrics()
    for rec in RECORDS:
        rm.update(rec)
    return rm


def test_scrape_run_and_service_metrics(run_metrics):
    rollout = ServiceMetrics("rollout", 0)
    with rollout.track("generate"):
        rollout.add_tokens(100)
    rollout.set_policy_version(1)
    with MetricsExporter(0, lambda: [rollout.exposition()], registry=run_metrics.registry) as exp:
        assert exp.port > 0 and exp.url == f"http://127.0.0.1:{exp.port}/metrics"
        text, ctype = scrape(exp.url)
        assert ctype.startswith("text/plain; version=0.0.4")
        index, _ = scrape(f"http://127.0.0.1:{exp.port}/")
        assert "/metrics" in index
        with pytest.raises(urllib.error.HTTPError):
            scrape(f"http://127.0.0.1:{exp.port}/nope")
    got = samples(text)
    none = frozenset()
    assert got[("flywheel_step", none)] == 2
    assert got[("flywheel_reward_mean", none)] == 0.5
    assert got[("flywheel_reward_std", none)] == 0.25
    assert got[("flywheel_gold_reward_mean", none)] == 0.1
    assert got[("flywheel_kl", none)] == 0.02
    assert got[("flywheel_response_length_mean", none)] == 14.0
    assert got[("flywheel_trajectories_total", none)] == 32
    assert got[("flywheel_dropped_stale_trajectories_total", none)] == 3
    assert got[("flywheel_step_seconds_count", none)] == 2
    assert got[("flywheel_step_seconds_sum", none)] == 42.0
    assert got[("flywheel_weight_sync_seconds_count", none)] == 1
    assert got[("flywheel_rollout_seconds_sum", none)] == pytest.approx(2.2)
    assert got[("flywheel_exporter_errors_total", none)] == 0
    # one policy_version family: the driver's and the rollout replica's
    assert got[("flywheel_policy_version", frozenset({"service": "driver", "replica": "0"}.items()))] == 2
    assert got[("flywheel_policy_version", frozenset({"service": "rollout", "replica": "0"}.items()))] == 1
    # service metrics are included
    labels = frozenset({"service": "rollout", "replica": "0", "method": "generate"}.items())
    assert got[("flywheel_requests_total", labels)] == 1
    assert got[("flywheel_rollout_tokens_total", frozenset({"service": "rollout", "replica": "0"}.items()))] == 100
    # a valid exposition for Prometheus itself: one HELP and one TYPE line per family, no *_created
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(helps) == len(set(helps)) and len(types) == len(set(types)) and set(helps) == set(types)
    assert "_created" not in text


def test_raising_collector_still_serves_run_metrics(run_metrics):
    calls = []

    def broken() -> list[str]:
        calls.append(1)
        raise ConnectionError("rollout actor died")

    exp = MetricsExporter(0, broken, registry=run_metrics.registry)
    try:
        first, _ = scrape(exp.url)
        second, _ = scrape(exp.url)
    finally:
        exp.close()
    assert len(calls) == 2
    assert samples(first)[("flywheel_exporter_errors_total", frozenset())] == 1
    got = samples(second)
    assert got[("flywheel_exporter_errors_total", frozenset())] == 2
    assert got[("flywheel_step", frozenset())] == 2
    assert not any(name == "flywheel_requests_total" for name, _ in got)
    with pytest.raises(OSError):  # closed: nothing listens any more
        scrape(exp.url)


def test_update_ignores_missing_and_bad_values():
    rm = RunMetrics()
    rm.update({})
    rm.update({"step": "three", "reward/mean": None, "rollout/trajectories": -4, "timing/step_s": float("inf")})
    got = samples(rm.exposition())
    assert got[("flywheel_step", frozenset())] == 0
    assert got[("flywheel_trajectories_total", frozenset())] == 0
    assert got[("flywheel_step_seconds_count", frozenset())] == 0


def test_port_in_use_is_a_user_error():
    from services.core.errors import UserError

    with MetricsExporter(0, lambda: []) as exp:
        with pytest.raises(UserError, match=str(exp.port)):
            MetricsExporter(exp.port, lambda: [])


def test_operations_metrics_score_time_disagreement_staleness_restarts():
    rm = RunMetrics()
    rm.update({"timing/score_s": 0.3, "reward/member_std": 0.2, "rollout/staleness_max": 0, "workers/restarts": 0})
    rm.update({"timing/score_s": 0.7, "reward/member_std": 0.15, "rollout/staleness_max": 1, "workers/restarts": 2})
    rm.update({"workers/restarts": 1})  # a step with one restart and nothing else logged
    rm.update({"workers/restarts": -1, "timing/score_s": -0.1})  # negative: ignored
    got = samples(rm.exposition())
    none = frozenset()
    assert got[("flywheel_score_seconds_count", none)] == 2
    assert got[("flywheel_score_seconds_sum", none)] == pytest.approx(1.0)
    assert got[("flywheel_score_seconds_bucket", frozenset({"le": "0.25"}.items()))] == 0
    assert got[("flywheel_score_seconds_bucket", frozenset({"le": "0.5"}.items()))] == 1
    assert got[("flywheel_score_seconds_bucket", frozenset({"le": "1.0"}.items()))] == 2
    assert got[("flywheel_ensemble_disagreement", none)] == 0.15
    assert got[("flywheel_trajectory_staleness_max", none)] == 1
    assert got[("flywheel_worker_restarts_total", none)] == 3
    assert samples(RunMetrics().exposition())[("flywheel_worker_restarts_total", none)] == 0  # exported from the start
