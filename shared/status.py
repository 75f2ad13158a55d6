"""What the queues and workers look like right now, read from Redis only.

``gather`` does the reading (one snapshot, no side effects); ``render`` and ``as_json`` turn a
snapshot into the terminal view and the machine-readable document of ``switchyard status``. The
gateway's queue gauges are fed from the same snapshot, so the two never disagree.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.messages import WorkerInfo
from shared.names import GROUP, Names

if TYPE_CHECKING:
    from shared.settings import GatewaySettings

CLEAR_SCREEN = "\x1b[H\x1b[2J"


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


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float
    streams: tuple[StreamStatus, ...]
    workers: tuple[WorkerStatus, ...]
    dead_letters: dict[str, int]

    def models(self) -> list[str]:
        found = {s.model for s in self.streams} | {w.model for w in self.workers} | set(self.dead_letters)
        return sorted(found)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def gather(redis: Redis, names: Names, worker_ttl: float = 10.0) -> Snapshot:
    """Read one snapshot; Redis errors propagate (the caller decides what 'down' looks like)."""
    now = time.time()
    workers = await _workers(redis, names, now, worker_ttl)
    models = {_text(m) for m in await redis.hkeys(names.models())}  # type: ignore[misc]
    models |= {w.model for w in workers}
    streams: list[StreamStatus] = []
    dead: dict[str, int] = {}
    for model in sorted(models):
        members = await redis.hkeys(names.streams_index(model))  # type: ignore[misc]
        for stream in sorted(_text(m) for m in members):
            streams.append(await _stream(redis, names, model, stream))
        dead[model] = int(await redis.xlen(names.dead_letter(model)))
    return Snapshot(taken_at=now, streams=tuple(streams), workers=tuple(workers), dead_letters=dead)


async def _workers(redis: Redis, names: Names, now: float, ttl: float) -> list[WorkerStatus]:
    ids = [_text(i) for i in await redis.zrange(names.workers(), 0, -1)]
    raws = await redis.mget([names.worker(i) for i in ids]) if ids else []
    out = []
    for raw in raws:
        if raw is None:  # its key expired: gone for good, only the index still names it
            continue
        try:
            info = WorkerInfo.model_validate_json(raw)
        except ValidationError:
            continue  # a worker of another release; it is not ours to describe
        age = max(0.0, now - info.heartbeat_at)
        out.append(
            WorkerStatus(
                id=info.id,
                model=info.model,
                age_s=age,
                live=age <= ttl,
                inflight=info.inflight,
                capacity=info.capacity,
                running=info.running,
                waiting=info.waiting,
                kv_cache_usage=info.kv_cache_usage,
                tokens_per_s=info.tokens_per_s,
            )
        )
    return sorted(out, key=lambda w: (w.model, w.id))


async def _stream(redis: Redis, names: Names, model: str, stream: str) -> StreamStatus:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(stream)
        pipe.xpending(stream, GROUP)
        pipe.xinfo_consumers(stream, GROUP)
        backlog, pending, consumers = await pipe.execute(raise_on_error=False)
    # No consumer group yet (no worker has looked at this stream): nothing is pending.
    pending_count = 0 if isinstance(pending, Exception) else int(pending["pending"])
    rows = [] if isinstance(consumers, Exception) else consumers
    return StreamStatus(
        model=model,
        tenant=stream.removeprefix(names.jobs_stream(model, "")),
        stream=stream,
        backlog=0 if isinstance(backlog, Exception) else int(backlog),
        pending=pending_count,
        consumers=tuple(
            ConsumerStatus(name=_text(c["name"]), pending=int(c["pending"]), idle_s=int(c["idle"]) / 1000)
            for c in rows
        ),
    )


# -- presentation (pure) -------------------------------------------------------------------------


def as_json(snap: Snapshot) -> dict[str, Any]:
    """The snapshot as one JSON-ready document, grouped by model."""
    models = []
    for model in snap.models():
        models.append(
            {
                "model": model,
                "dead_letter": snap.dead_letters.get(model, 0),
                "tenants": [
                    {k: v for k, v in asdict(s).items() if k != "model"}
                    for s in snap.streams
                    if s.model == model
                ],
                "workers": [
                    {k: v for k, v in asdict(w).items() if k != "model"}
                    for w in snap.workers
                    if w.model == model
                ],
            }
        )
    return {"taken_at": snap.taken_at, "models": models}


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = indent + "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _consumers(stream: StreamStatus) -> str:
    if not stream.consumers:
        return "-"
    return ", ".join(f"{c.name} ({c.pending} pending, idle {_age(c.idle_s)})" for c in stream.consumers)


def render(snap: Snapshot) -> str:
    """The terminal view: per model, its tenants' queues, its workers and its dead letters."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.taken_at))
    lines = [f"switchyard status at {when}"]
    if not snap.models():
        return "\n".join([*lines, "", "no model has been served here yet"])
    for model in snap.models():
        streams = [s for s in snap.streams if s.model == model]
        workers = [w for w in snap.workers if w.model == model]
        live = sum(w.live for w in workers)
        lines += ["", f"model {model}: {live} live worker(s), dead letters {snap.dead_letters.get(model, 0)}"]
        queue_rows = [[s.tenant, str(s.backlog), str(s.pending), _consumers(s)] for s in streams]
        lines += _table(["tenant", "backlog", "pending", "consumers"], queue_rows)
        worker_rows = [
            [
                w.id,
                _age(w.age_s) + ("" if w.live else " (stale)"),
                f"{w.inflight}/{w.capacity}",
                str(w.running),
                str(w.waiting),
                f"{w.kv_cache_usage * 100:.1f}%",
                f"{w.tokens_per_s:.1f}",
            ]
            for w in workers
        ]
        if worker_rows:
            lines.append("")
            lines += _table(
                ["worker", "heartbeat", "jobs", "running", "waiting", "kv cache", "tokens/s"], worker_rows
            )
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------------


def run_status(settings: GatewaySettings, *, as_json: bool, watch: float | None) -> None:
    """``switchyard status``: print once, or every ``watch`` seconds until interrupted."""
    asyncio.run(_status(settings, as_json, watch))


async def _status(settings: GatewaySettings, json_out: bool, watch: float | None) -> None:
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=5)
    try:
        while True:
            try:
                snap = await gather(redis, settings.names, settings.worker_ttl)
            except (RedisError, OSError) as exc:
                raise ConnectionError(f"cannot read Redis at {settings.redis_url}: {exc}") from exc
            if json_out:
                print(json.dumps(as_json(snap)), flush=True)  # one document a line under --watch
            else:
                print((CLEAR_SCREEN if watch else "") + render(snap), flush=True)
            if watch is None:
                return
            await asyncio.sleep(watch)
    finally:
        await redis.aclose()
