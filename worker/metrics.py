"""The worker's Prometheus metrics, served with vLLM's own ``vllm:*`` metrics on one port.

vLLM registers its metrics on prometheus-client's default registry in this process; the worker's
live on a registry of their own (one per consumer, so tests can build several) that is attached to
the default one while the consumer runs. ``switchyard worker --metrics-port`` serves the lot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from shared.messages import Job
from worker.health import Health

QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60)
RATE_WINDOW = 10.0
OUTCOMES = (
    "completed",
    "failed",
    "cancelled",
    "abandoned",
    "handed_back",
    "preempted",
    "taken_over",
    "dead_lettered",
)


class TokenRate:
    """Tokens per second over a sliding window, kept as per-second buckets."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self._window = window
        self._buckets: deque[tuple[int, int]] = deque()

    def add(self, tokens: int, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1] = (second, self._buckets[-1][1] + tokens)
        else:
            self._buckets.append((second, tokens))
        self._trim(second)

    def per_second(self, now: float | None = None) -> float:
        second = int(time.monotonic() if now is None else now)
        self._trim(second)
        return sum(n for _, n in self._buckets) / self._window

    def _trim(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self._window:
            self._buckets.popleft()


class WorkerMetrics:
    """Every worker metric, labelled with the one model this worker serves."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.model = model
        self.rate = TokenRate()
        self._running = Gauge("switchyard:worker_jobs_running", "Jobs running", ["model"], registry=reg)
        self._jobs = Counter(
            "switchyard:worker_jobs", "Jobs ended, by outcome", ["model", "outcome"], registry=reg
        )
        self._tokens = Counter(
            "switchyard:worker_generation_tokens", "Tokens generated", ["model"], registry=reg
        )
        self._published = Counter(
            "switchyard:worker_messages_published", "Reply messages published", ["model"], registry=reg
        )
        self._handed = Counter(
            "switchyard:worker_jobs_handed_over",
            "Jobs handed to the worker their prompt prefix belongs to (prefix affinity)",
            ["model"],
            registry=reg,
        )
        self._queue_time = Histogram(
            "switchyard:worker_queue_time_seconds",
            "Enqueue (gateway clock) to taken by this worker",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=reg,
        )
        # Every series exists from the start at 0, so dashboards and rate() see no gap before a job.
        for metric in (self._running, self._tokens, self._published, self._handed, self._queue_time):
            metric.labels(model)
        for outcome in OUTCOMES:
            self._jobs.labels(model, outcome)
        # The series counted on every message, looked up once: labels() costs a lock and a dict
        # lookup per call, which the token path would pay per message.
        self._tokens_series = self._tokens.labels(model)
        self._published_series = self._published.labels(model)

    def job_started(self, job: Job) -> None:
        self._running.labels(self.model).inc()
        self._queue_time.labels(self.model).observe(max(0.0, time.time() - job.created_at))

    def job_left(self) -> None:
        self._running.labels(self.model).dec()

    def outcome(self, outcome: str) -> None:
        """One of :data:`OUTCOMES`."""
        self._jobs.labels(self.model, outcome).inc()

    def generated(self, tokens: int) -> None:
        if tokens:
            self._tokens_series.inc(tokens)
            self.rate.add(tokens)

    def handed_over(self) -> None:
        self._handed.labels(self.model).inc()

    def published(self, messages: int = 1) -> None:
        self._published_series.inc(messages)

    def tokens_per_s(self) -> float:
        return round(self.rate.per_second(), 1)

    def export(self) -> None:
        """Show these metrics on the default registry (the one the metrics server serves)."""
        REGISTRY.register(self.registry)

    def withdraw(self) -> None:
        REGISTRY.unregister(self.registry)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line each
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _exposition(start_response: Callable[..., Any]) -> list[bytes]:
    """Always the plain text format: prometheus-client's OpenMetrics output (which Prometheus asks
    for when it can) rewrites the colons of ``vllm:*`` and ``switchyard:*`` names to underscores,
    so the stored series would no longer match the names that dashboards and alerts query."""
    start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
    return [generate_latest(REGISTRY)]


def _answer(start_response: Callable[..., Any], ok: bool) -> list[bytes]:
    start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"ok\n" if ok else b"no\n"]


class MetricsServer:
    """An HTTP server for the default registry (vLLM's metrics included) and the worker's health
    (see :mod:`worker.health`), in a daemon thread."""

    def __init__(self, port: int, health: Health, host: str = "0.0.0.0") -> None:
        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/readyz":
                return _answer(start_response, health.ready())
            if path == "/healthz":
                return _answer(start_response, health.alive())
            if path in ("/", "/metrics"):
                return _exposition(start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]

        self._server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
