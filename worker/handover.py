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
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.names import GROUP, Names

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
