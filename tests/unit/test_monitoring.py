"""cluster/monitoring/: the Grafana dashboard covers every operations panel, uses the
provisioned datasource and only metrics the driver's exporter serves; the metrics config
reaches the exporter and Ray."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import REPO

MONITORING = REPO / "cluster" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "flywheel.json"
DATASOURCE_UID = "flywheel-prometheus"

# each dashboard item of issue #7 -> metric names of which at least one panel must query one
REQUIRED = {
    "reward": {"flywheel_reward_mean"},
    "gold reward": {"flywheel_gold_reward_mean"},
    "KL": {"flywheel_kl"},
    "throughput": {"flywheel_rollout_tokens_total"},
    "step time: rollout": {"flywheel_rollout_seconds_sum", "flywheel_rollout_seconds_bucket"},
    "step time: score": {"flywheel_score_seconds_sum", "flywheel_score_seconds_bucket"},
    "step time: train": {"flywheel_train_seconds_sum", "flywheel_train_seconds_bucket"},
    "step time: sync": {"flywheel_weight_sync_seconds_sum"},
    "weight-sync latency": {"flywheel_weight_sync_seconds_bucket"},
    "policy-version lag": {"flywheel_policy_version", "flywheel_trajectory_staleness_max",
                           "flywheel_trajectory_staleness_mean"},
    "ensemble disagreement": {"flywheel_ensemble_disagreement"},
    "reward variance": {"flywheel_reward_variance_mean", "flywheel_reward_std"},
    "worker restarts": {"flywheel_worker_restarts_total"},
    "rollout workers": {"flywheel_rollout_workers"},
    "held-out evaluation": {"flywheel_eval_pass_at_1", "flywheel_eval_reward_mean"},
}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_NAMES = re.compile(r"(?<![\w:])flywheel_[A-Za-z0-9_:]*")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expr_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers and strings removed first)."""
    return set(_NAMES.findall(_MATCHERS.sub("", _STRINGS.sub('""', expr))))


def dashboard_metric_names(dashboard: dict) -> set[str]:
    return {n for panel in dashboard["panels"] for t in panel["targets"] for n in expr_metric_names(t["expr"])}


def exposition_names(text: str) -> set[str]:
    """Every series name an exposition offers: sample names, plus each family's names from its
    TYPE line (``_bucket``/``_sum``/``_count`` of histograms), so a labelled family with no
    child yet (``flywheel_errors_total`` before the first error) still counts."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()[:4]
            suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
            names.update(family + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group())
    return names


def test_expr_metric_names():
    assert expr_metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(flywheel_weight_sync_seconds_bucket{job="flywheel_x"}[5m])))'
    ) == {"flywheel_weight_sync_seconds_bucket"}
    assert expr_metric_names('max(flywheel_policy_version{service="driver"}) - min(flywheel_policy_version)') == {
        "flywheel_policy_version"}
    text = "# HELP a_seconds x\n# TYPE a_seconds histogram\na_seconds_count 1.0\n# TYPE b_total counter\n"
    assert exposition_names(text) == {"a_seconds_bucket", "a_seconds_sum", "a_seconds_count", "b_total"}


def test_dashboard_has_a_panel_for_every_operations_item():
    dashboard = load_dashboard()
    panel_names = [set().union(*(expr_metric_names(t["expr"]) for t in p["targets"])) for p in dashboard["panels"]]
    missing = [item for item, names in REQUIRED.items() if not any(names & used for used in panel_names)]
    assert not missing, f"no panel queries {missing}"
    # the step-time breakdown is one panel with all four phases
    phases = {"flywheel_rollout_seconds_sum", "flywheel_score_seconds_sum", "flywheel_train_seconds_sum",
              "flywheel_weight_sync_seconds_sum"}
    assert any(phases <= used for used in panel_names)


def test_panels_are_titled_timeseries_on_the_provisioned_datasource():
    dashboard = load_dashboard()
    provisioned = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/flywheel.yaml").read_text())
    (source,) = provisioned["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    ids, titles = [p["id"] for p in dashboard["panels"]], [p["title"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids) and len(set(titles)) == len(titles)
    for panel in dashboard["panels"]:
        assert panel["type"] == "timeseries" and panel["title"].strip(), panel
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == DATASOURCE_UID
            assert target["expr"].strip() and target["refId"]
    for p in dashboard["panels"]:  # no two panels overlap on the 24-column grid
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in dashboard["panels"]
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
    assert len(cells) == len(set(cells))


def test_dashboard_provider_points_at_the_mounted_dashboards():
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/flywheel.yaml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_only_uses_metrics_the_exporter_serves():
    """Names checked against a fresh driver exposition plus one actor's (no Ray needed); the
    integration test checks them again against a live run."""
    from services.core.service_metrics import ServiceMetrics, merge_expositions
    from services.driver.exporter import RunMetrics

    text = merge_expositions([RunMetrics().exposition(), ServiceMetrics("rollout", 0).exposition()])
    used = dashboard_metric_names(load_dashboard())
    assert used and not used - exposition_names(text), sorted(used - exposition_names(text))


def test_prometheus_config_scrapes_the_driver_and_ray():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"flywheel", "ray"}
    assert any(t.endswith(":8000") for c in jobs["flywheel"]["static_configs"] for t in c["targets"])
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert jobs["ray"]["static_configs"][0]["targets"]


def test_metrics_config_defaults_and_bounds():
    from pydantic import ValidationError

    from services.core.config import MetricsConfig

    m = MetricsConfig()
    assert m.prometheus_host == "127.0.0.1" and m.ray_metrics_port is None
    assert MetricsConfig(ray_metrics_port=8080, prometheus_host="0.0.0.0").ray_metrics_port == 8080
    with pytest.raises(ValidationError):
        MetricsConfig(ray_metrics_port=70000)
    with pytest.raises(ValidationError):
        MetricsConfig(prometheus_host="")


def test_init_ray_passes_the_ray_metrics_port(monkeypatch):
    import ray

    from services.core.config import FlywheelConfig
    from services.core import ray_session

    calls = []
    monkeypatch.setattr(ray_session.os, "environ", dict(ray_session.os.environ))  # init_ray sets engine env vars
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    ray_session.init_ray(FlywheelConfig.model_validate({"metrics": {"ray_metrics_port": 8080}}))
    ray_session.init_ray(FlywheelConfig())
    assert [c["_metrics_export_port"] for c in calls] == [8080, None]


def test_exporter_binds_the_configured_host():
    import urllib.request

    from services.driver.exporter import MetricsExporter

    with MetricsExporter(0, lambda: [], host="localhost") as exp:
        assert exp.url == f"http://localhost:{exp.port}/metrics"
        with urllib.request.urlopen(exp.url, timeout=10) as resp:
            assert resp.status == 200
