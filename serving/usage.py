"""Per-tenant usage: every finished request is logged (by :meth:`Admission.settle`), and a
housekeeping job rolls the log up into hourly counts per model, kept for the retention time.

The roll-up is exactly-once: the counts, the cursor (the last log entry counted) and the trimming
of what was counted are applied in one transaction that fails if another roll-up moved the cursor
first. Days are UTC; each tenant's day is one hash, ``HH|model|metric`` -> count, which expires by
itself at the end of the retention time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from redis.exceptions import WatchError

from shared.messages import UsageEvent, WireError
from shared.names import Names
from shared.tenants import removed_before

METRICS = ("requests", "errors", "prompt_tokens", "completion_tokens")
READ_BATCH = 5_000
"""Log entries rolled up per transaction."""


def entry_ms(entry_id: str) -> int:
    """When a stream entry was added (its id's milliseconds)."""
    return int(entry_id.split("-", 1)[0])


def next_id(entry_id: str) -> str:
    """The smallest id after ``entry_id``: XTRIM's MINID keeps it and what follows."""
    ms, seq = entry_id.split("-", 1)
    return f"{ms}-{int(seq) + 1}"


def day_and_hour(ms: int) -> tuple[str, str]:
    at = datetime.fromtimestamp(ms / 1000, UTC)
    return at.strftime("%Y-%m-%d"), at.strftime("%H")


def tally(
    entries: Iterable[tuple[str, UsageEvent]], removed: Mapping[str, float] | None = None
) -> dict[tuple[str, str], Counter[str]]:
    """Pure: log entries -> (tenant, day) -> ``HH|model|metric`` -> count to add. Entries logged
    before their tenant was removed (``removed``: name -> Unix seconds) are not counted: a tenant
    given that name later must not inherit them."""
    out: dict[tuple[str, str], Counter[str]] = {}
    removed = removed or {}
    for entry_id, event in entries:
        if entry_ms(entry_id) <= removed.get(event.tenant, -1.0) * 1000:
            continue
        day, hour = day_and_hour(entry_ms(entry_id))
        counts = out.setdefault((event.tenant, day), Counter())
        base = f"{hour}|{event.model}|"
        counts[base + "requests"] += 1
        counts[base + "errors"] += 1 if event.error else 0
        counts[base + "prompt_tokens"] += event.prompt_tokens
        counts[base + "completion_tokens"] += event.completion_tokens
    return out


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One tenant's use of one model in one hour."""

    start_time: int
    model: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_bucket(self) -> dict[str, object]:
        return {
            "object": "usage.bucket",
            "start_time": self.start_time,
            "end_time": self.start_time + 3600,
            "model": self.model,
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def rows_of(day: str, fields: dict[bytes, bytes], since: int, until: int) -> list[UsageRow]:
    """Pure: one day's hash -> its rows whose hour starts in [since, until)."""
    found: dict[tuple[int, str], dict[str, int]] = {}
    for raw, value in fields.items():
        hour, model, metric = raw.decode().split("|", 2)
        start = int(datetime.strptime(f"{day} {hour}", "%Y-%m-%d %H").replace(tzinfo=UTC).timestamp())
        if since <= start < until and metric in METRICS:
            found.setdefault((start, model), {})[metric] = int(value)
    return [UsageRow(start, model, **counts) for (start, model), counts in sorted(found.items())]


class Usage:
    def __init__(self, redis: Redis, names: Names, retention_days: int) -> None:
        self._redis = redis
        self._names = names
        self._retention_days = retention_days

    async def roll_up(self) -> int:
        """Count every logged request not counted yet; returns how many were."""
        total = 0
        while True:
            try:
                done = await self._roll_up_some()
            except WatchError:  # another roll-up moved the cursor: go on from where it left
                continue
            total += done
            if done < READ_BATCH:
                return total

    async def _roll_up_some(self) -> int:
        n = self._names
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(n.usage_cursor())
            cursor = await pipe.get(n.usage_cursor())
            start = "(" + cursor.decode() if cursor else "-"
            raw = await pipe.xrange(n.usage_log(), min=start, count=READ_BATCH)
            entries = []
            for entry_id, fields in raw:
                try:
                    entries.append((entry_id.decode(), UsageEvent.parse(fields)))
                except WireError:  # a damaged entry is skipped, never allowed to block the rest
                    continue
            if not raw:
                await pipe.reset()
                return 0
            last = raw[-1][0].decode()
            removed = await removed_before(self._redis, n)
            pipe.multi()
            ttl = self._retention_days * 86400 + 86400
            for (tenant, day), counts in tally(entries, removed).items():
                key = n.usage(tenant, day)
                for field, amount in counts.items():
                    if amount:
                        pipe.hincrby(key, field, amount)
                pipe.expire(key, ttl)
                pipe.sadd(n.usage_tenants(), tenant)
            pipe.set(n.usage_cursor(), last)
            pipe.xtrim(n.usage_log(), minid=next_id(last))
            await pipe.execute()
        return len(raw)

    async def read(self, tenant: str, since: int, until: int | None = None) -> list[UsageRow]:
        """The tenant's hourly rows from ``since`` to ``until`` (Unix seconds; now if unset), within
        the retention time."""
        now = int(time.time())
        until = min(until if until is not None else now + 3600, now + 3600)
        since = max(since, now - self._retention_days * 86400 - 86400)
        if since >= until:
            return []
        days = []
        day = datetime.fromtimestamp(since, UTC).date()
        while day <= datetime.fromtimestamp(until, UTC).date():
            days.append(day.isoformat())
            day += timedelta(days=1)
        async with self._redis.pipeline(transaction=False) as pipe:
            for d in days:
                pipe.hgetall(self._names.usage(tenant, d))
            hashes = await pipe.execute()
        return [
            row for d, fields in zip(days, hashes, strict=True) for row in rows_of(d, fields, since, until)
        ]

    async def forget(self, tenant: str) -> int:
        """Delete a tenant's rolled-up usage (it was removed); returns the days deleted."""
        days = [k async for k in self._redis.scan_iter(self._names.usage(tenant, "*"), count=500)]
        if days:
            await self._redis.delete(*days)
        await self._redis.srem(self._names.usage_tenants(), tenant)  # type: ignore[misc]
        return len(days)

    async def tenants(self) -> list[str]:
        return sorted(t.decode() for t in await self._redis.smembers(self._names.usage_tenants()))  # type: ignore[misc]
