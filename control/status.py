"""``switchyard status``: what the queues and workers look like right now, read from Redis only.

:func:`shared.fleet.gather` does the reading (one snapshot, no side effects); ``render`` and
``as_json`` here turn a snapshot into the terminal view and the machine-readable document. The
gateway's queue gauges are fed from the same snapshot, so the two never disagree.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.fleet import Snapshot, StreamStatus, gather
from shared.settings import GatewaySettings, redact_url

CLEAR_SCREEN = "\x1b[H\x1b[2J"


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
        # A tenant may have two streams: its requests, and its Batch API lines (batch priority).
        queue_rows = [
            [
                s.tenant + (" (batch)" if s.priority == "batch" else ""),
                str(s.backlog),
                str(s.pending),
                _consumers(s),
            ]
            for s in streams
        ]
        lines += _table(["tenant", "backlog", "pending", "consumers"], queue_rows)
        worker_rows = [
            [
                w.id + ("" if w.engine == "vllm" else f" ({w.engine})"),  # a simulated worker says so
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
                where = redact_url(settings.redis_url)
                raise ConnectionError(f"cannot read Redis at {where}: {exc}") from exc
            if json_out:
                print(json.dumps(as_json(snap)), flush=True)  # one document a line under --watch
            else:
                print((CLEAR_SCREEN if watch else "") + render(snap), flush=True)
            if watch is None:
                return
            await asyncio.sleep(watch)
    finally:
        await redis.aclose()
