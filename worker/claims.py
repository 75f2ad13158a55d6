"""A worker's claims on the jobs it runs: kept fresh while it lives, taken over when it went silent.

A job entry stays pending (``XPENDING``) under the worker that read it until that worker ends the
job. A claim left idle for ``reclaim_idle`` seconds is taken over (``XAUTOCLAIM``) by another worker,
which resumes the job from its progress; so a live worker refreshes its claims well within that time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.names import GROUP, as_text
from shared.scripts import REFRESH_CLAIMS
from worker.inflight import Inflight
from worker.reader import Take
from worker.streams import JobStreams

log = logging.getLogger(__name__)


class ClaimKeeper(threading.Thread):
    """Refreshes a worker's claims from a thread with its own Redis connection.

    Refreshing must not wait for the event loop: with many streams on a host short of CPU one turn
    of the loop can take seconds, and a live worker would lose its jobs (they would stay correct,
    the writes being fenced, but be redone elsewhere). The thread needs the GIL only for a moment
    each period. A claim found lost (another worker took the job) is reported to ``lost`` on the
    event loop.
    """

    def __init__(
        self,
        redis_url: str,
        worker_id: str,
        inflight: Inflight,
        reclaim_idle: float,
        period: float,
        lost: Callable[[str, str], None],
    ) -> None:
        super().__init__(name="claim-keeper", daemon=True)
        self._redis_url = redis_url
        self._worker_id = worker_id
        self._inflight = inflight
        self._idle = reclaim_idle
        self._period = period
        self._lost = lost
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        idle = self._idle
        redis = SyncRedis.from_url(self._redis_url, socket_timeout=max(1.0, idle / 3))
        refresh = redis.register_script(REFRESH_CLAIMS.text)
        refreshed = time.monotonic()
        try:
            while not self._stop.wait(self._period):
                late = time.monotonic() - refreshed
                if late > idle / 2:  # the whole process is starved: its jobs are about to move
                    log.warning("claims refreshed after %.1fs (reclaim idle %.0fs): short of CPU", late, idle)
                try:
                    for stream, ids in self._inflight.entries().items():
                        lost = refresh(keys=[stream, GROUP], args=[self._worker_id, *ids])
                        for entry_id in lost:
                            self._loop.call_soon_threadsafe(self._lost, stream, as_text(entry_id))
                    refreshed = time.monotonic()
                except (RedisError, OSError) as exc:
                    log.warning("refreshing claims failed: %s", exc)
                except RuntimeError:  # the event loop closed: the worker is gone
                    return
        finally:
            redis.close()


class Reclaimer:
    """Takes over jobs whose worker went silent, as many as this worker has room for."""

    def __init__(
        self,
        redis: Redis,
        worker_id: str,
        streams: JobStreams,
        inflight: Inflight,
        reclaim_idle: float,
        take: Take,
    ) -> None:
        self._redis = redis
        self._worker_id = worker_id
        self._streams = streams
        self._inflight = inflight
        self._idle_ms = int(reclaim_idle * 1000)
        self._take = take

    async def reclaim(self) -> None:
        for stream in await self._streams.current():
            free = self._inflight.free()
            if free <= 0:
                return
            reply = await self._redis.xautoclaim(
                stream, GROUP, self._worker_id, self._idle_ms, "0-0", count=free
            )
            for entry_id, fields in claimed_entries(reply):
                delivered = await self._deliveries(stream, entry_id)
                log.info("took over job entry %s on %s (delivery %d)", entry_id, stream, delivered)
                await self._take(stream, entry_id, fields, delivered)

    async def _deliveries(self, stream: str, entry_id: str) -> int:
        rows = await self._redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 1


def claimed_entries(reply: Iterable[object]) -> list[tuple[str, dict[bytes, bytes] | None]]:
    """XAUTOCLAIM's claimed entries on Redis 6.2 (2 items) and 7.x (3 items, deleted ids apart)."""
    items = list(reply)
    entries = items[1] if len(items) > 1 else []
    out: list[tuple[str, dict[bytes, bytes] | None]] = []
    for entry in entries or ():  # type: ignore[attr-defined]
        entry_id, fields = entry
        if entry_id is None:  # Redis 6.2 reports an entry deleted since it was read as nil
            continue
        out.append((as_text(entry_id), fields))
    return out
