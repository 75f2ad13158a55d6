"""Periodic work off the token path, run by the background role on a schedule (see
:mod:`batch.role`): expiring files and finished batches, trimming dead-letter streams,
rolling up usage, and recounting the bytes files take. Each job is a plain method here, callable
against any Redis; each run is logged in ``Names.housekeeping_log``.

Dead letters are trimmed to a bound without dropping anything unread: whoever must see every dead
letter reads the stream through a consumer group, and no entry that a group has not been delivered
or has not acknowledged is ever trimmed (the stream may then stay above the bound).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError, WatchError

from batch.batches import Batches
from batch.files import RESERVATION_TTL, Files
from batch.revocation import purge_removed
from serving.usage import Usage, next_id
from shared.fleet import known_models
from shared.names import Names
from shared.settings import BackgroundSettings

LOG_BOUND = 1000
RECOUNT_TRIES = 5
"""Housekeeping runs kept in the log."""
PAGE = 500


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def unread_from(last_delivered: str, oldest_pending: str | None) -> str:
    """Pure: the first entry a consumer group still needs: its oldest unacknowledged entry, or else
    the one after the last it was delivered."""
    after = next_id(last_delivered)
    if oldest_pending is None:
        return after
    return min(oldest_pending, after, key=id_key)


def trim_minid(first_kept: str, unread: Iterable[str]) -> str:
    """Pure: where to trim (``XTRIM MINID``): at the first entry the bound keeps, or earlier if a
    group has not read an entry before it."""
    return min([first_kept, *unread], key=id_key)


@dataclass
class Housekeeping:
    redis: Redis
    settings: BackgroundSettings

    @property
    def names(self) -> Names:
        return self.settings.names

    async def expire(self, now: float | None = None) -> dict[str, int]:
        """Delete files past their expiry (not while a running batch reads them), the records of
        batches finished longer ago than the retention time, and what removed tenants had."""
        now = time.time() if now is None else now
        files = await Files(self.redis, self.settings).expire(now)
        batches = await Batches(self.redis, self.settings).expire(now)
        purged = await purge_removed(self.redis, self.settings, now)
        return {"files": files, "batches": batches, **{f"removed_{k}": v for k, v in purged.items()}}

    async def recount_files(self, now: float | None = None) -> dict[str, int]:
        """Set the store's and each tenant's byte counters to what the file records and the uploads
        under way add up to, after giving back the room of uploads whose gateway died. Every step
        moves a counter together with its record, but a process killed in an older release, or a
        counter set by hand, would otherwise drift until every upload is refused."""
        now = time.time() if now is None else now
        files = Files(self.redis, self.settings)
        lapsed = await files.release_lapsed(now)
        swept = await files.store.sweep_parts(older_than=RESERVATION_TTL)
        for _ in range(RECOUNT_TRIES):
            try:
                drift = await self._recount(files)
            except WatchError:  # a file came or went meanwhile: count again
                continue
            return {"reservations_lapsed": lapsed, "parts_swept": swept, "drift": drift}
        return {"reservations_lapsed": lapsed, "parts_swept": swept, "skipped": 1}

    async def _recount(self, files: Files) -> int:
        n = self.names
        async with self.redis.pipeline(transaction=True) as pipe:
            # Every counter step moves the store's counter too: watching it catches any change.
            await pipe.watch(n.file_bytes())
            before = int(await self.redis.get(n.file_bytes()) or 0)
            total, tenants = await files.usage()
            counters = [k.decode() async for k in self.redis.scan_iter(n.tenant_file_bytes("*"), count=PAGE)]
            pipe.multi()
            pipe.set(n.file_bytes(), total)
            for key in counters:
                pipe.delete(key)
            for tenant, size in tenants.items():
                pipe.set(n.tenant_file_bytes(tenant), size)
            await pipe.execute()
        return before - total

    async def trim_dead_letters(self) -> dict[str, int]:
        """Trim every model's dead-letter stream to ``dead_letter_max`` entries, oldest first,
        keeping every entry a consumer group has not read. Returns entries dropped per model."""
        dropped = {}
        for model in sorted(await known_models(self.redis, self.names)):
            gone = await self._trim(self.names.dead_letter(model), self.settings.dead_letter_max)
            if gone:
                dropped[model] = gone
        return dropped

    async def _trim(self, stream: str, bound: int) -> int:
        excess = int(await self.redis.xlen(stream)) - bound
        if excess <= 0:
            return 0
        unread = await self._unread(stream)
        if not unread:
            return int(await self.redis.xtrim(stream, maxlen=bound, approximate=False))
        last, start = "", "-"
        left = excess
        while left > 0:  # the ids of the `excess` oldest entries, a page at a time
            page = await self.redis.xrange(stream, min=start, count=min(PAGE, left))
            if not page:
                break
            last = page[-1][0].decode()
            start, left = "(" + last, left - len(page)
        if not last:
            return 0
        minid = trim_minid(next_id(last), unread)
        return int(await self.redis.xtrim(stream, minid=minid, approximate=False))

    async def _unread(self, stream: str) -> list[str]:
        """Where each consumer group of the stream still has entries to read or acknowledge."""
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:  # no such stream
            return []
        out = []
        for group in groups:
            name = group["name"]
            pending = await self.redis.xpending(stream, name) if int(group["pending"]) else None
            oldest = pending["min"].decode() if pending and pending["min"] else None
            out.append(unread_from(group["last-delivered-id"].decode(), oldest))
        return out

    async def roll_up_usage(self) -> dict[str, int]:
        usage = Usage(self.redis, self.names, self.settings.usage_retention_days)
        return {"requests": await usage.roll_up()}

    async def log_run(self, job: str, tick: str, result: dict[str, int], took: float) -> None:
        fields = {
            "job": job,
            "tick": tick,
            "process": f"{socket.gethostname()}:{os.getpid()}",
            "took_ms": round(took * 1000),
            **{f"result.{k}": v for k, v in result.items()},
        }
        await self.redis.xadd(self.names.housekeeping_log(), fields, maxlen=LOG_BOUND, approximate=True)  # type: ignore[arg-type]
