"""Client disconnects, as the gateways announce them on one channel: abort those jobs here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.names import Names

log = logging.getLogger(__name__)


async def listen_for_cancels(
    redis: Redis, names: Names, stopping: asyncio.Event, cancel: Callable[[str], object]
) -> None:
    """Call ``cancel(job_id)`` for every announced cancel until ``stopping``; resubscribes after a
    lost connection (a job whose cancel was missed meanwhile still finds the cancelled marker when
    it starts, or runs to its end)."""
    while not stopping.is_set():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(names.cancel_channel())
            async for message in pubsub.listen():
                if message["type"] == "message":
                    data = message["data"]
                    cancel(data.decode() if isinstance(data, bytes) else data)
        except (RedisError, OSError) as exc:
            log.warning("cancel channel lost: %s", exc)
            await asyncio.sleep(1.0)
        finally:
            await pubsub.aclose()
