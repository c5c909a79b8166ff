"""A real Prometheus scrapes a real toy GRPO run (`flywheel train` in a subprocess) through the
driver's exporter; the run's exposition passes `promtool check metrics` and serves every
metric the Grafana dashboard queries; cluster/monitoring/prometheus.yml passes `promtool
check config`.

Needs the `prometheus` and `promtool` binaries (`make install` installs Debian's package)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import pytest

from tests.conftest import DIST_ENV, REPO
from tests.unit.test_monitoring import (
    MONITORING, dashboard_metric_names, expr_metric_names, exposition_names, load_dashboard,
)

MISSING = [b for b in ("prometheus", "promtool") if shutil.which(b) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not on PATH (`make install` installs Debian's prometheus package)"
)
STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def api(base: str, path: str, **params) -> dict:
    """Prometheus HTTP API; an error answer (e.g. a PromQL syntax error) comes back as its JSON."""
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        return json.loads(get(url, timeout=10))
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read().decode())


def last_step(exposition: str) -> float:
    for line in exposition.splitlines():
        if line.startswith("flywheel_step "):
            return float(line.split()[1])
    return 0.0


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the driver checkpoints and shuts Ray down), then SIGKILL to the whole group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the run's local Ray, if any
    except ProcessLookupError:
        pass


def test_promtool_accepts_the_monitoring_config():
    proc = subprocess.run(["promtool", "check", "config", str(MONITORING / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


@pytest.fixture
def prometheus(tmp_path):
    """Prometheus on a free loopback port scraping 127.0.0.1:<driver port> every second."""
    driver_port, web_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: flywheel, static_configs: [{{targets: ['127.0.0.1:{driver_port}']}}]}}\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{web_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                get(f"{base}/-/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.2)
        yield {"base": base, "driver_port": driver_port}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_prometheus_scrapes_a_toy_grpo_run(prometheus, toy_sft_run, tmp_path):
    base, driver_port = prometheus["base"], prometheus["driver_port"]
    metrics_url = f"http://127.0.0.1:{driver_port}/metrics"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # as conftest.run_flywheel
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    command = [
        sys.executable, "-m", "services.cli", "train", "grpo-toy", "--out", str(tmp_path / "run"),
        f"model.path={toy_sft_run['out'] / 'model'}", f"algorithm.total_steps={STEPS}",
        "rollout.prompts_per_step=4", f"metrics.prometheus_port={driver_port}",
    ]
    started = time.monotonic()
    out_log = (tmp_path / "train.log").open("w")
    # own process group: a run that has to be killed takes its local Ray's processes with it
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out_log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    exposition, target_up, first_scrape_s, serving_since = "", False, None, None
    try:
        deadline = started + 600
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not finish in 10 minutes"
            try:
                text = get(metrics_url)
                if first_scrape_s is None:
                    first_scrape_s, serving_since = time.monotonic() - started, time.time()
                if last_step(text) >= 1:
                    exposition = text  # the latest one from a run that has made a step
            except OSError:
                pass  # not serving yet (or any more)
            if not target_up:
                targets = api(base, "targets")["data"]["activeTargets"]
                target_up = any(t["labels"]["job"] == "flywheel" and t["health"] == "up" for t in targets)
            time.sleep(0.5)
        proc.wait(timeout=60)
    finally:
        stop(proc)
        out_log.close()
    run_s = time.monotonic() - started
    log = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    print(f"flywheel train: {run_s:.1f} s in all, the exporter serving after {first_scrape_s or float('nan'):.1f} s")

    # (a) Prometheus saw the driver's target up during the run
    assert target_up, log[-2000:]
    # (b) it stored the step metrics (range functions: the series went stale when the run ended)
    assert exposition, "never fetched an exposition after step 1"
    (tmp_path / "exposition.txt").write_text(exposition)  # for a look when a check below fails
    time.sleep(1)
    result = api(base, "query", query="max_over_time(flywheel_step[10m])")
    assert result["status"] == "success", result
    (series,) = result["data"]["result"]
    assert float(series["value"][1]) >= 1
    tokens = api(base, "query", query="max(max_over_time(flywheel_rollout_tokens_total[10m]))")["data"]["result"]
    assert tokens and float(tokens[0]["value"][1]) > 0  # the actors' metrics come through the driver's port
    # every dashboard expression is valid PromQL and, where the run had its metrics, shows data
    with_samples = {line.split("{")[0].split()[0] for line in exposition.splitlines() if line[:1] not in ("#", "")}
    window = {"start": f"{serving_since - 5:.3f}", "end": f"{time.time():.3f}", "step": "1"}
    for panel in load_dashboard()["panels"]:
        for target in panel["targets"]:
            answer = api(base, "query_range", query=target["expr"], **window)
            assert answer["status"] == "success", (panel["title"], target["expr"], answer)
            if expr_metric_names(target["expr"]) <= with_samples:
                assert answer["data"]["result"], (panel["title"], target["expr"], "no data")

    # (c) the live exposition (driver + learner, reference, reward and rollout actors) lints clean
    assert {'service="rollout"', 'service="learner"', 'service="reward"', 'service="reference"'} <= {
        part for line in exposition.splitlines() if line.startswith("flywheel_requests_total")
        for part in line[line.index("{") + 1:line.index("}")].split(",") if part.startswith("service=")
    }
    lint = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=60)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr
    # (d) the dashboard queries only metrics the exposition has
    used = dashboard_metric_names(load_dashboard())
    missing = used - exposition_names(exposition)
    assert not missing, sorted(missing)
