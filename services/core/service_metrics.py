"""Prometheus metrics of one service actor (prometheus-client, one registry per actor).

Names follow DESIGN.md: ``flywheel_`` prefix, base units, ``_total`` for counters,
histograms for latencies, labels only ``service`` / ``replica`` / ``method`` (no ids).
The driver collects ``exposition()`` from every actor and serves the merged text
(``merge_expositions``) on one port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: they double the families and nobody graphs them

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServiceMetrics:
    """Requests, errors, latency and the policy version of one service replica."""

    def __init__(self, service: str, replica: int | str = 0):
        self.registry = CollectorRegistry()
        self.labels = {"service": service, "replica": str(replica)}
        names = ["service", "replica"]
        self._requests = Counter(
            "flywheel_requests_total", "Requests handled", names + ["method"], registry=self.registry
        )
        self._errors = Counter(
            "flywheel_errors_total", "Requests that raised", names + ["method"], registry=self.registry
        )
        self._latency = Histogram(
            "flywheel_request_seconds", "Request latency", names + ["method"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._version = Gauge(
            "flywheel_policy_version", "Policy version the replica holds", names, registry=self.registry
        )
        self._tokens = Counter(
            "flywheel_rollout_tokens_total", "Tokens generated", names, registry=self.registry
        )
        self._version.labels(**self.labels).set(0)
        self._tokens.labels(**self.labels)  # export 0 before the first token

    @contextmanager
    def track(self, method: str) -> Iterator[None]:
        """Count the request, time it, and count it as an error if it raises."""
        labels = {**self.labels, "method": method}
        self._requests.labels(**labels).inc()
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self._errors.labels(**labels).inc()
            raise
        finally:
            self._latency.labels(**labels).observe(time.perf_counter() - started)

    def set_policy_version(self, version: int) -> None:
        self._version.labels(**self.labels).set(version)

    def add_tokens(self, count: int) -> None:
        self._tokens.labels(**self.labels).inc(count)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


def merge_expositions(texts: list[str]) -> str:
    """Merge several actors' exposition texts into one valid text (one block per family).

    Each actor's samples carry distinct ``service``/``replica`` labels, so merging is a
    union of sample lines under one HELP/TYPE header per family (the first one seen).
    """
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                kind = line.split()[1]
                # one HELP and one TYPE per family: Prometheus rejects a second one, even
                # when two actors (or the driver) describe the same family differently
                if not any(h.split()[1] == kind for h in headers.setdefault(family, [])):
                    headers[family].append(line)
                samples.setdefault(family, [])
            elif line.strip() and family is not None:
                samples[family].append(line)
    return "".join("\n".join(headers[f] + samples[f]) + "\n" for f in headers)
