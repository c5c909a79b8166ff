"""Prometheus HTTP exporter of the driver: its own run metrics plus every actor's exposition.

GET /metrics serves ``merge_expositions([driver text, *collect_texts()])``. Names follow
DESIGN.md (``flywheel_`` prefix, base units, ``_total`` counters, no id labels). The run
metrics carry no labels, except ``flywheel_policy_version{service="driver",replica="0"}``,
which shares its family with the actors' gauge of the same name (the version each replica
holds), so ``driver - min(rollout replicas)`` is the rollout lag in one family.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.core.errors import UserError
from services.core.service_metrics import merge_expositions  # also disables *_created series

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

GAUGES = {  # metrics.jsonl key -> (gauge name, help)
    "step": ("flywheel_step", "Last completed RL step"),
    "reward/mean": ("flywheel_reward_mean", "Mean (ensemble) proxy reward of the last step's batch"),
    "reward/std": ("flywheel_reward_std", "Std of the proxy reward over the last step's batch"),
    "gold/mean": ("flywheel_gold_reward_mean", "Mean gold reward of the last step's batch"),
    "eval/reward_mean": ("flywheel_eval_reward_mean", "Mean reward on the held-out prompts at the last evaluation"),
    "eval/pass@1": ("flywheel_eval_pass_at_1", "pass@1 of the verifiable scorer on the held-out prompts at the last evaluation"),
    "eval/gold_mean": ("flywheel_eval_gold_reward_mean", "Toy world: mean gold reward on the held-out prompts"),
    "rollout/truncated_fraction": (
        "flywheel_truncated_fraction", "Share of the last step's responses cut at rollout.max_tokens"
    ),
    "train/kl": ("flywheel_kl", "KL to the reference policy at the last step"),
    "rollout/response_length_mean": ("flywheel_response_length_mean", "Mean response length (tokens)"),
    "perf/generated_tokens_per_s": (
        "flywheel_generated_tokens_per_second", "Response tokens the last step's rollout sampled, per second of it"
    ),
    "perf/train_tokens_per_s": (
        "flywheel_train_tokens_per_second", "Prompt + response tokens the last step trained on, per second of training"
    ),
    **{f"perf/share/{phase}": (f"flywheel_step_share_{phase}", f"Share of the last step's wall time spent in {what}")
       for phase, what in (("rollout", "the rollout"), ("scoring", "the reward ensemble"),
                           ("reference", "reference log-probs"), ("training", "the learner's update"),
                           ("sync", "the weight sync"), ("eval", "held-out evaluation"),
                           ("driver", "none of the timed phases (driver overhead)"))},
    "dpo/ches_mean": ("flywheel_dpo_ches_mean", "Mean CHES score of the step's DPO pairs (before filtering)"),
    "dpo/chosen_logp_delta": (
        "flywheel_dpo_chosen_logp_delta", "Mean change of log p(chosen) across the last DPO update"
    ),
    "dpo/displacement_alarm": (
        "flywheel_dpo_likelihood_displacement_alarm",
        "1 while log p(chosen) has fallen for algorithm.displacement_patience steps in a row",
    ),
    "reward/var_mean": ("flywheel_reward_variance_mean", "Mean per-prompt reward variance over the n samples"),
    "reward/var_p10": ("flywheel_reward_variance_p10", "10th percentile of the per-prompt reward variance"),
    "reward/var_p50": ("flywheel_reward_variance_p50", "Median per-prompt reward variance"),
    "reward/var_frac_below": (
        "flywheel_reward_variance_low_fraction", "Share of prompts whose reward variance is below reward.variance.threshold"
    ),
    "reward/member_std": (
        "flywheel_ensemble_disagreement", "Std across the reward ensemble's members, averaged over the step's batch"
    ),
    "rollout/workers": ("flywheel_rollout_workers", "Rollout workers that generated the last step's batch"),
    "rollout/workers_target": (
        "flywheel_rollout_workers_target", "Rollout workers asked for (flywheel scale, rollout.autoscale), starting ones included"
    ),
    "rollout/turns_mean": ("flywheel_episode_turns_mean", "Multi-turn episodes: policy turns per episode, last step"),
    "rollout/tool_calls_mean": (
        "flywheel_episode_tool_calls_mean", "Multi-turn episodes: tool calls per episode, last step"
    ),
    "rollout/staleness_max": (
        "flywheel_trajectory_staleness_max", "Largest policy-version lag of a trajectory trained on at the last step"
    ),
    "rollout/staleness_mean": (
        "flywheel_trajectory_staleness_mean", "Mean policy-version lag of the trajectories trained on at the last step"
    ),
    "rollout/logprob_gap_max": (
        "flywheel_logprob_gap_max",
        "Largest |engine - learner| log-prob of a sampled token under the same weights, last measurement",
    ),
    "rollout/logprob_gap_mean": (
        "flywheel_logprob_gap_mean", "Mean |engine - learner| log-prob of the sampled tokens, last measurement"
    ),
    "rollout/logprob_gap_ratio_outside": (
        "flywheel_logprob_ratio_outside_fraction",
        "Share of sampled tokens whose learner/engine probability ratio is outside [0.5, 2], last measurement",
    ),
    "rollout/logprob_gap_alarm": (
        "flywheel_logprob_gap_alarm", "1 while the log-prob gap is above rollout.logprob_gap_alarm"
    ),
}
HISTOGRAMS = {
    "timing/step_s": ("flywheel_step_seconds", "Wall time of one RL step"),
    "timing/rollout_s": ("flywheel_rollout_seconds", "Rollout time per step"),
    "timing/score_s": ("flywheel_score_seconds", "Scoring time per step (reward ensemble, reference, critic)"),
    "timing/train_s": ("flywheel_train_seconds", "Learner time per step"),
    "timing/sync_s": ("flywheel_weight_sync_seconds", "Weight sync time per step"),
}
COUNTERS = {  # per-step counts in the record, accumulated here
    "rollout/trajectories": ("flywheel_trajectories_total", "Trajectories generated"),
    "rollout/dropped_stale": ("flywheel_dropped_stale_trajectories_total", "Trajectories dropped as too stale"),
    "workers/restarts": ("flywheel_worker_restarts_total", "Actor (worker) restarts"),
}


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class RunMetrics:
    """The driver's run metrics in their own registry; ``update`` takes one metrics.jsonl record."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self._gauges = {k: Gauge(n, h, registry=r) for k, (n, h) in GAUGES.items()}
        self._hists = {k: Histogram(n, h, buckets=STEP_BUCKETS, registry=r) for k, (n, h) in HISTOGRAMS.items()}
        self._counters = {k: Counter(n, h, registry=r) for k, (n, h) in COUNTERS.items()}
        version = Gauge("flywheel_policy_version", "Policy version the replica holds (driver: latest published)",
                        ["service", "replica"], registry=r)
        self._version = version.labels(service="driver", replica="0")
        self._version.set(0)

    def update(self, record: dict) -> None:
        """Missing, non-numeric and non-finite values are ignored (negative counts too)."""
        get = lambda key: _finite(record.get(key))  # noqa: E731
        for key, gauge in self._gauges.items():
            if (v := get(key)) is not None:
                gauge.set(v)
        if (v := get("policy_version")) is not None:
            self._version.set(v)
        for key, hist in self._hists.items():
            if (v := get(key)) is not None and v >= 0:
                hist.observe(v)
        for key, counter in self._counters.items():
            if (v := get(key)) is not None and v >= 0:
                counter.inc(v)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


class MetricsExporter:
    """Serves GET /metrics on ``host:port`` from a daemon thread; ``port=0`` picks a free port.

    The body merges ``registry`` (the driver's run metrics), the exporter's error counter and
    ``collect_texts()`` (the actors' expositions, called once per scrape).
    """

    def __init__(self, port: int, collect_texts: Callable[[], list[str]], host: str = "127.0.0.1",
                 registry: CollectorRegistry | None = None):
        self.registry = registry  # the driver's own metrics, e.g. RunMetrics().registry
        self.collect_texts = collect_texts
        self._registry = CollectorRegistry()
        self._errors = Counter("flywheel_exporter_errors_total", "Scrapes where collecting actor metrics failed",
                               registry=self._registry)
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = urlsplit(self.path).path
                if path == "/metrics":
                    body, ctype, status = exporter.render().encode(), CONTENT_TYPE, 200
                elif path == "/":
                    body, ctype, status = b"Flywheel driver metrics: see /metrics\n", "text/plain", 200
                else:
                    body, ctype, status = b"not found\n", "text/plain", 404
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # no line on stderr per scrape
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise UserError(f"metrics.prometheus_port: cannot serve on {host}:{port}: {exc.strerror or exc}") from exc
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="metrics-exporter",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def render(self) -> str:
        """The scrape body: run metrics, exporter errors and whatever the actors returned."""
        try:
            actors = merge_expositions(list(self.collect_texts()))  # raises on a non-text item too
        except Exception as exc:  # an unreachable actor must not take the run metrics down
            log.warning("collecting actor metrics failed: %r", exc)
            self._errors.inc()
            actors = ""
        own = [generate_latest(r).decode() for r in (self.registry, self._registry) if r is not None]
        return merge_expositions(own + [actors])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsExporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
