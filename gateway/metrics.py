"""The gateway's Prometheus metrics (names: see the README's "Metrics and status"), and their hooks.

One :class:`GatewayMetrics` per app, on its own registry. When ``PROMETHEUS_MULTIPROC_DIR`` is set
(``switchyard gateway --processes N`` sets it), every process writes its samples there and
``GET /metrics`` answers, from whichever process gets the scrape, the sum over all of them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError
from scaling.decision import Decision
from serving.replies import SubscriptionLost
from shared.fleet import Snapshot
from shared.messages import Final, Job, Started, Tokens, Vectors

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MASTER_ENV = "SWITCHYARD_GATEWAY_MASTER"
"""Set in each process of a gateway that runs several: the pid of the process that started them."""

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LOOP_LAG_PERIOD = 0.05
"""Seconds between two looks at the event loop's lateness: often enough to see stalls of tens of
milliseconds, and twenty wake-ups a second cost nothing measurable."""

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
UNKNOWN_MODEL = "unknown"
REASONS = (
    "invalid",
    "too_large",
    "auth",
    "model_not_found",
    "no_worker",
    "context_length",
    "rate_limit",
    "backlog_full",
    "redis_unavailable",
)
DEFAULT_TENANT = "default"


def multiprocess_dir() -> str | None:
    """The shared sample directory, when this gateway runs as several processes."""
    return os.environ.get(MULTIPROC_ENV) or None


def rejection_reason(exc: APIError) -> str:
    """The ``rejections_total`` reason of an error raised before a job was enqueued."""
    code = exc.code or ""
    if exc.status in (401, 403):
        return "auth"
    if exc.status == 413:
        return "too_large"
    if exc.status == 404:
        return "model_not_found"
    if exc.status == 429:
        return "backlog_full" if "backlog" in code else "rate_limit"
    if exc.status == 400:
        return "context_length" if code == "context_length_exceeded" else "invalid"
    if isinstance(exc.__cause__, RedisError | OSError | SubscriptionLost):
        return "redis_unavailable"
    if "backlog" in code or code == "overloaded":
        return "backlog_full"
    if exc.status == 503:
        return "no_worker"
    return "invalid"


class GatewayMetrics:
    """Every gateway metric, registered on a private registry (tests may build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._streams_seen: set[tuple[str, str]] = set()
        self._models_seen: set[str] = set()
        self._scaled: set[str] = set()
        reg = self.registry
        mt = ("model", "tenant")
        self.requests = Counter(
            "switchyard:requests",
            "Finished requests",
            ["model", "tenant", "endpoint", "status"],
            registry=reg,
        )
        self.rejections = Counter("switchyard:rejections", "Refused before enqueue", ["reason"], registry=reg)
        self.errors = Counter(
            "switchyard:request_errors", "Failed after admission", ["model", "tenant", "code"], registry=reg
        )
        self.e2e = Histogram(
            "switchyard:e2e_request_latency_seconds",
            "Enqueue to last token",
            mt,
            buckets=E2E_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "switchyard:time_to_first_token_seconds",
            "Enqueue to first token",
            mt,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.tpot = Histogram(
            "switchyard:time_per_output_token_seconds",
            "Mean gap between tokens",
            mt,
            buckets=TPOT_BUCKETS,
            registry=reg,
        )
        self.queue_time = Histogram(
            "switchyard:request_queue_time_seconds",
            "Enqueue to start",
            mt,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = Counter("switchyard:prompt_tokens", "Prompt tokens", mt, registry=reg)
        self.generation_tokens = Counter("switchyard:generation_tokens", "Generated tokens", mt, registry=reg)
        self.in_flight = Gauge(
            "switchyard:requests_in_flight",
            "Admitted, unfinished",
            ["model"],
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.queue_depth = Gauge(
            "switchyard:queue_depth", "XLEN of the job stream", mt, multiprocess_mode="max", registry=reg
        )
        self.jobs_pending = Gauge(
            "switchyard:jobs_pending",
            "Taken by a worker, unfinished",
            mt,
            multiprocess_mode="max",
            registry=reg,
        )
        self.live_workers = Gauge(
            "switchyard:live_workers",
            "Workers with a fresh heartbeat",
            ["model"],
            multiprocess_mode="max",
            registry=reg,
        )
        self.dead_letter_jobs = Gauge(
            "switchyard:dead_letter_jobs",
            "Dead-letter stream length",
            ["model"],
            multiprocess_mode="max",
            registry=reg,
        )
        self.desired_workers = Gauge(
            "switchyard:desired_workers",
            "Workers the scaling decision wants for the model (what KEDA scales on)",
            ["model"],
            multiprocess_mode="max",
            registry=reg,
        )
        self.loop_lag = Histogram(
            "switchyard:gateway_event_loop_lag_seconds",
            "How late the event loop ran a timer: every request's next step waits as long",
            buckets=LOOP_LAG_BUCKETS,
            registry=reg,
        )
        self.redis_up = Gauge(
            "switchyard:redis_up", "1 when the last Redis read worked", multiprocess_mode="min", registry=reg
        )
        self.batches = BatchCollector()
        reg.register(self.batches)
        for reason in REASONS:  # at 0 from the start: a rate over a missing series is no data, not 0
            self.rejections.labels(reason)
        if multiprocess_dir() is None:
            ProcessCollector(registry=reg)

    # -- hooks -----------------------------------------------------------------------------------

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def finished(self, model: str, tenant: str, endpoint: str, status: int) -> None:
        self.requests.labels(model, tenant, endpoint, str(status)).inc()

    def track(self, job: Job) -> RequestTrack:
        return RequestTrack(self, job)

    def queues(self, snap: Snapshot) -> None:
        """Set the Redis-derived gauges from a fresh snapshot; drop series of what is gone."""
        self.redis_up.set(1)
        streams = {(s.model, s.tenant) for s in snap.streams}
        models = set(snap.models())
        for gone in self._streams_seen - streams:
            self.queue_depth.remove(*gone)
            self.jobs_pending.remove(*gone)
        for gone_model in self._models_seen - models:
            self.live_workers.remove(gone_model)
            self.dead_letter_jobs.remove(gone_model)
        self._streams_seen, self._models_seen = streams, models
        for s in snap.streams:
            self.queue_depth.labels(s.model, s.tenant).set(s.backlog)
            self.jobs_pending.labels(s.model, s.tenant).set(s.pending)
        for model in models:
            self.live_workers.labels(model).set(sum(w.live for w in snap.workers if w.model == model))
            self.dead_letter_jobs.labels(model).set(snap.dead_letters.get(model, 0))

    def scaling(self, decisions: Mapping[str, Decision]) -> None:
        for gone in set(self._scaled) - set(decisions):
            self.desired_workers.remove(gone)
        self._scaled = set(decisions)
        for model, decision in decisions.items():
            self.desired_workers.labels(model).set(decision.desired)

    async def watch_loop(self, period: float = LOOP_LAG_PERIOD) -> None:
        """Observe, every ``period`` seconds, how much later than asked the event loop woke this
        task. One process relays every stream it serves on one loop, so a loop busy with their
        tokens (or stopped by a garbage collection) delays every request's admission, enqueue and
        first token alike: sustained lag says to add gateway processes (``--processes``)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            self.loop_lag.observe(max(0.0, loop.time() - due))

    # -- exposition ------------------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The ``/metrics`` body: this process's registry, or the sum over every gateway process."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        merged.register(_SiblingProcesses())
        merged.register(self.batches)
        return generate_latest(merged), CONTENT_TYPE_LATEST

    def process_exited(self) -> None:
        """Drop this process's share of live-summed gauges (in-flight) from the shared directory."""
        if multiprocess_dir() is not None:
            multiprocess.mark_process_dead(os.getpid())


BATCH_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
LINE_STATES = ("queued", "running", "completed", "failed")
LINE_OUTCOMES = ("completed", "failed")


class BatchCollector:
    """The Batch API's figures as the queue probe last read them from Redis (a scrape never waits
    on Redis): unfinished batches by status, their lines by state, and lines finished ever. Every
    gateway reports the same figures, so dashboards take the ``max`` over gateways."""

    def __init__(self) -> None:
        self.batches: dict[str, int] = dict.fromkeys(BATCH_STATUSES, 0)
        self.lines: dict[str, int] = dict.fromkeys(LINE_STATES, 0)
        self.finished: dict[str, int] = dict.fromkeys(LINE_OUTCOMES, 0)

    def update(self, batches: dict[str, int], lines: dict[str, int], finished: dict[str, int]) -> None:
        """New figures; statuses, states and outcomes not named are 0 (their series stay)."""
        self.batches = {s: batches.get(s, 0) for s in BATCH_STATUSES}
        self.lines = {s: lines.get(s, 0) for s in LINE_STATES}
        self.finished = {o: finished.get(o, 0) for o in LINE_OUTCOMES}

    def collect(self) -> Iterable[Metric]:
        batches = GaugeMetricFamily("switchyard:batches", "Unfinished batches by status", labels=["status"])
        for status, count in self.batches.items():
            batches.add_metric([status], count)
        lines = GaugeMetricFamily(
            "switchyard:batch_lines",
            "Lines of unfinished batches (queued: not fed yet; running: on a worker queue)",
            labels=["state"],
        )
        for state, count in self.lines.items():
            lines.add_metric([state], count)
        finished = CounterMetricFamily(
            "switchyard:batch_lines_finished", "Batch lines finished ever, by outcome", labels=["outcome"]
        )
        for outcome, count in self.finished.items():
            finished.add_metric([outcome], count)
        yield from (batches, lines, finished)


class RequestTrack:
    """Timings and counts of one admitted request, fed by its reply stream."""

    def __init__(self, metrics: GatewayMetrics, job: Job) -> None:
        self._m = metrics
        self._labels = (job.model, job.tenant)
        self._created = job.created_at
        self._first_token: float | None = None
        self._open = True
        metrics.in_flight.labels(job.model).inc()

    def saw(self, reply: Started | Tokens | Vectors | Final) -> None:
        now = time.time()
        if isinstance(reply, Started):
            self._m.queue_time.labels(*self._labels).observe(max(0.0, now - self._created))
        elif isinstance(reply, Tokens):
            if self._first_token is None and reply.token_ids:
                self._first_token = now - self._created
                self._m.ttft.labels(*self._labels).observe(max(0.0, self._first_token))
        elif isinstance(reply, Final):
            e2e = max(0.0, now - self._created)
            self._m.e2e.labels(*self._labels).observe(e2e)
            usage = reply.usage
            self._m.prompt_tokens.labels(*self._labels).inc(usage.prompt_tokens)
            self._m.generation_tokens.labels(*self._labels).inc(usage.completion_tokens)
            if self._first_token is not None and usage.completion_tokens > 1:
                per_token = (e2e - self._first_token) / (usage.completion_tokens - 1)
                self._m.tpot.labels(*self._labels).observe(max(0.0, per_token))

    def failed(self, exc: APIError) -> None:
        self._m.errors.labels(*self._labels, exc.code or "error").inc()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._m.in_flight.labels(self._labels[0]).dec()


class RequestCounter:
    """ASGI middleware: counts every finished completion request by status, 413s included."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers if the app dies before starting a response
        state = scope.setdefault("state", {})

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if status == 413:  # refused by the body-size guard, before any handler ran
                self.metrics.rejected("too_large")
            model = state.get("model", UNKNOWN_MODEL)
            self.metrics.finished(model, state.get("tenant", DEFAULT_TENANT), endpoint, status)


class _SiblingProcesses:
    """``process_*`` summed over the gateway's processes (the master and its workers)."""

    def collect(self) -> Iterable[Metric]:
        cpu = rss = 0.0
        for proc in _gateway_processes():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    cpu += times.user + times.system
                    rss += proc.memory_info().rss
            except psutil.Error:  # exited between listing and reading: its share is gone anyway
                continue
        yield CounterMetricFamily("process_cpu_seconds", "CPU seconds of all gateway processes", value=cpu)
        yield GaugeMetricFamily("process_resident_memory_bytes", "RSS of all gateway processes", value=rss)


def _gateway_processes() -> list[psutil.Process]:
    master = os.environ.get(MASTER_ENV)
    if not master:
        return [psutil.Process()]
    try:
        parent = psutil.Process(int(master))
        return [parent, *parent.children()]
    except psutil.Error:  # the master is gone: this process is all there is
        return [psutil.Process()]
