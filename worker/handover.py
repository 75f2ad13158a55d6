"""Handing a job to another worker (prefix affinity), and receiving one.

The giver transfers the stream entry to the taker's name in the consumer group (``XCLAIM ...
JUSTID``, which does not count as a delivery) and tells it on its inbox channel; the taker reads
the entry and starts it. Failover is untouched: an entry handed to a worker that died before taking
it is pending under that worker like any of its jobs, and another worker takes it over after
``reclaim_idle``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.fleet import live_workers
from shared.names import GROUP, Names
from worker.prefix_affinity import Peer

log = logging.getLogger(__name__)

SEPARATOR = "\n"  # no stream name or entry id holds a line break

Take = Callable[[str, str, dict[bytes, bytes] | None], Awaitable[None]]
"""Start a handed-over job: stream, entry id, fields."""


async def hand_over(redis: Redis, names: Names, stream: str, entry_id: str, worker: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xclaim(stream, GROUP, worker, 0, [entry_id], justid=True)
        pipe.publish(names.inbox(worker), f"{stream}{SEPARATOR}{entry_id}")
        await pipe.execute()


async def receive(redis: Redis, names: Names, worker_id: str, stopping: asyncio.Event, take: Take) -> None:
    """Start every job handed to this worker until ``stopping``."""
    while not stopping.is_set():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(names.inbox(worker_id))
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                data = message["data"]
                stream, _, entry_id = (data.decode() if isinstance(data, bytes) else data).partition(
                    SEPARATOR
                )
                found = await redis.xrange(stream, entry_id, entry_id)
                if found:  # else it ended meanwhile (another worker took it over and finished it)
                    await take(stream, entry_id, found[0][1])
        except (RedisError, OSError) as exc:
            log.warning("inbox lost: %s", exc)
            await asyncio.sleep(1.0)
        finally:
            await pubsub.aclose()


class Peers:
    """The model's other live workers, re-read at most every ``refresh`` seconds."""

    def __init__(self, redis: Redis, names: Names, model: str, ttl: float, refresh: float) -> None:
        self._redis = redis
        self._names = names
        self._model = model
        self._ttl = ttl
        self._refresh = refresh
        self._peers: list[Peer] = []
        self._read_at = float("-inf")

    async def current(self) -> list[Peer]:
        if time.monotonic() - self._read_at >= self._refresh:
            self._read_at = time.monotonic()
            try:
                workers = await live_workers(self._redis, self._names, self._ttl)
            except (RedisError, OSError) as exc:
                log.warning("cannot read the other workers (%s): jobs run where they are read", exc)
                self._peers = []
            else:
                self._peers = [
                    Peer(w.id, w.inflight, w.capacity)
                    for w in workers
                    if w.model == self._model and not w.draining
                ]
        return self._peers
