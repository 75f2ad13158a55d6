"""The fleet as Redis holds it: workers from their heartbeats, and each model's job streams.

One reader and one definition of a live worker (its heartbeat is at most ``worker_ttl`` seconds old)
for every component that asks: the gateway's model registry, admission's backlog figures, the queue
gauges, ``switchyard status`` and the autoscaler. A heartbeat record that cannot be decoded (a worker
of another release, a damaged key) is skipped and logged, never allowed to fail the reader.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from shared.messages import StreamRecord, WireError, WorkerInfo, decode_stream_record, decode_worker_info
from shared.names import GROUP, Names, as_text

log = logging.getLogger(__name__)

DEFAULT_WORKER_TTL = 10.0


def is_live(info: WorkerInfo, now: float, ttl: float) -> bool:
    """The one definition of a live worker: it sent a heartbeat within ``ttl`` seconds."""
    return now - info.heartbeat_at <= ttl


@dataclass(frozen=True, slots=True)
class ConsumerStatus:
    name: str
    pending: int
    idle_s: float


@dataclass(frozen=True, slots=True)
class StreamStatus:
    model: str
    tenant: str
    stream: str
    backlog: int
    """XLEN: jobs waiting or running (finished jobs leave the stream)."""
    pending: int
    """XPENDING: jobs a worker has taken and not finished."""
    consumers: tuple[ConsumerStatus, ...]
    priority: str = "interactive"


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    id: str
    model: str
    age_s: float
    """Seconds since the worker's last heartbeat."""
    live: bool
    inflight: int
    capacity: int
    running: int
    waiting: int
    kv_cache_usage: float
    tokens_per_s: float
    engine: str = "vllm"
    draining: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float
    streams: tuple[StreamStatus, ...]
    workers: tuple[WorkerStatus, ...]
    dead_letters: dict[str, int]
    drained: dict[str, int] = field(default_factory=dict)
    """Jobs finished ever, per model (the counter workers increment)."""

    def models(self) -> list[str]:
        found = {s.model for s in self.streams} | {w.model for w in self.workers} | set(self.dead_letters)
        return sorted(found)

    def backlog(self, model: str) -> int:
        """Jobs of ``model`` waiting or running (finished jobs leave their stream)."""
        return sum(s.backlog for s in self.streams if s.model == model)

    def running(self, model: str) -> int:
        """Jobs of ``model`` a worker has taken and not finished."""
        return sum(s.pending for s in self.streams if s.model == model)

    def waiting(self, model: str) -> int:
        """Jobs of ``model`` no worker has taken yet."""
        return sum(max(0, s.backlog - s.pending) for s in self.streams if s.model == model)

    def serving(self, model: str) -> list[WorkerStatus]:
        """Live workers of ``model`` that take jobs (not draining)."""
        return [w for w in self.workers if w.model == model and w.live and not w.draining]


class BadRecords:
    """Logs each undecodable record once, not at every read: a reader that polls keeps one."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def report(self, key: str, exc: WireError) -> None:
        if key not in self._seen:
            if len(self._seen) > 10_000:
                self._seen.clear()
            self._seen.add(key)
            log.warning("skipping %s: %s", key, exc)


async def worker_records(
    redis: Redis, names: Names, since: float = float("-inf"), bad: BadRecords | None = None
) -> list[WorkerInfo]:
    """Heartbeat records of the workers whose last beat was at or after ``since`` (Unix time)."""
    bad = bad or BadRecords()
    ids = [as_text(i) for i in await redis.zrangebyscore(names.workers(), since, "+inf")]
    if not ids:
        return []
    keys = [names.worker(i) for i in ids]
    out = []
    for key, raw in zip(keys, await redis.mget(keys), strict=True):
        if raw is None:  # expired: gone for good, only the index still names it
            continue
        try:
            out.append(decode_worker_info(raw))
        except WireError as exc:
            bad.report(key, exc)
    return out


async def live_workers(
    redis: Redis, names: Names, ttl: float, bad: BadRecords | None = None
) -> list[WorkerInfo]:
    now = time.time()
    return [w for w in await worker_records(redis, names, now - ttl, bad) if is_live(w, now, ttl)]


async def stream_records(
    redis: Redis, names: Names, model: str, bad: BadRecords | None = None
) -> dict[str, StreamRecord]:
    """Every job stream of ``model`` with its tenant and priority class."""
    bad = bad or BadRecords()
    index = await redis.hgetall(names.streams_index(model))  # type: ignore[misc]
    out = {}
    for stream, raw in index.items():
        key = as_text(stream)
        try:
            out[key] = decode_stream_record(raw)
        except WireError as exc:
            bad.report(f"{names.streams_index(model)} {key}", exc)
    return out


async def known_models(redis: Redis, names: Names) -> set[str]:
    """Every model a worker has ever served here (the gateway tells 'unknown' from 'no worker now')."""
    return {as_text(m) for m in await redis.hkeys(names.models())}  # type: ignore[misc]


async def model_records(redis: Redis, names: Names, bad: BadRecords | None = None) -> dict[str, WorkerInfo]:
    """The last heartbeat of any worker of each model ever served here: how to serve it while no
    worker is live (its tokenizer and context length)."""
    bad = bad or BadRecords()
    out = {}
    for model, raw in (await redis.hgetall(names.models())).items():  # type: ignore[misc]
        try:
            out[as_text(model)] = decode_worker_info(raw)
        except WireError as exc:
            bad.report(f"{names.models()} {as_text(model)}", exc)
    return out


def _worker_status(info: WorkerInfo, now: float, ttl: float) -> WorkerStatus:
    return WorkerStatus(
        id=info.id,
        model=info.model,
        age_s=max(0.0, now - info.heartbeat_at),
        live=is_live(info, now, ttl),
        inflight=info.inflight,
        capacity=info.capacity,
        running=info.running,
        waiting=info.waiting,
        kv_cache_usage=info.kv_cache_usage,
        tokens_per_s=info.tokens_per_s,
        engine=info.engine,
        draining=info.draining,
    )


async def gather(
    redis: Redis, names: Names, worker_ttl: float = DEFAULT_WORKER_TTL, bad: BadRecords | None = None
) -> Snapshot:
    """Read one snapshot; Redis errors propagate (the caller decides what 'down' looks like)."""
    now = time.time()
    bad = bad or BadRecords()
    workers = sorted(
        (_worker_status(w, now, worker_ttl) for w in await worker_records(redis, names, bad=bad)),
        key=lambda w: (w.model, w.id),
    )
    models = await known_models(redis, names) | {w.model for w in workers}
    streams: list[StreamStatus] = []
    dead: dict[str, int] = {}
    drained: dict[str, int] = {}
    for model in sorted(models):
        records = await stream_records(redis, names, model, bad)
        for stream in sorted(records):
            streams.append(await _stream(redis, model, stream, records[stream]))
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xlen(names.dead_letter(model))
            pipe.get(names.drained(model))
            dead_count, done = await pipe.execute()
        dead[model], drained[model] = int(dead_count), int(done or 0)
    return Snapshot(
        taken_at=now, streams=tuple(streams), workers=tuple(workers), dead_letters=dead, drained=drained
    )


async def _stream(redis: Redis, model: str, stream: str, record: StreamRecord) -> StreamStatus:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(stream)
        pipe.xpending(stream, GROUP)
        pipe.xinfo_consumers(stream, GROUP)
        length, pending, consumers = await pipe.execute(raise_on_error=False)
    # No consumer group yet (no worker has looked at this stream): nothing is pending.
    pending_count = 0 if isinstance(pending, Exception) else int(pending["pending"])
    rows = [] if isinstance(consumers, Exception) else consumers
    return StreamStatus(
        model=model,
        tenant=record.tenant,
        stream=stream,
        priority=record.priority,
        backlog=0 if isinstance(length, Exception) else int(length),
        pending=pending_count,
        consumers=tuple(
            ConsumerStatus(name=as_text(c["name"]), pending=int(c["pending"]), idle_s=int(c["idle"]) / 1000)
            for c in rows
        ),
    )
