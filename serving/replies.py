"""One pub/sub connection per gateway process, shared by every request in flight.

Each request subscribes to its own reply channel and waits for Redis to confirm the subscription
before its job is enqueued, so no reply can be published before someone listens. A lost connection
fails every open subscription at once (clients get an error, never a hang); the hub then reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class SubscriptionLost(Exception):
    """The pub/sub connection dropped; replies may have been missed."""


@dataclass(eq=False)
class Subscription:
    channel: str
    queue: asyncio.Queue[bytes | Exception] = field(default_factory=asyncio.Queue)
    confirmed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    async def get(self) -> bytes:
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def fail(self, error: Exception) -> None:
        """End the wait of whoever reads this subscription with ``error``."""
        self.queue.put_nowait(error)


class ReplyHub:
    def __init__(self, redis: Redis, control_channel: str, subscribe_timeout: float = 5.0) -> None:
        self._redis = redis
        self._control = control_channel
        self._timeout = subscribe_timeout
        self._subs: dict[bytes, Subscription] = {}
        self._pubsub: PubSub | None = None
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Read the shared connection forever, reconnecting with backoff after failures."""
        backoff = 0.1
        while True:
            try:
                await self._serve()
            except (RedisError, OSError) as exc:
                log.warning("reply connection lost: %s", exc)
            self.connected.clear()
            self._fail_all(SubscriptionLost("lost the connection to Redis while waiting for replies"))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _serve(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            # A standing subscription keeps the connection in subscribed mode, so reads block.
            await pubsub.subscribe(self._control)
            self._pubsub = pubsub
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                self._dispatch(message)
                if message["type"] == "subscribe" and message["channel"] == self._control.encode():
                    self.connected.set()
        finally:
            self._pubsub = None
            await pubsub.aclose()

    def _dispatch(self, message: dict[str, object]) -> None:
        channel = message["channel"]
        assert isinstance(channel, bytes)
        sub = self._subs.get(channel)
        if sub is None:
            return
        kind = message["type"]
        if kind == "message":
            data = message["data"]
            assert isinstance(data, bytes)
            sub.queue.put_nowait(data)
        elif kind == "subscribe" and not sub.confirmed.done():
            sub.confirmed.set_result(None)

    def _fail_all(self, error: SubscriptionLost) -> None:
        for sub in self._subs.values():
            sub.queue.put_nowait(error)
            if not sub.confirmed.done():
                sub.confirmed.set_exception(error)
        self._subs.clear()

    async def open(self, channel: str) -> Subscription:
        """Subscribe and wait until Redis has confirmed it."""
        pubsub = self._pubsub
        if pubsub is None or not self.connected.is_set():
            raise SubscriptionLost("not connected to Redis")
        sub = Subscription(channel)
        self._subs[channel.encode()] = sub
        try:
            async with asyncio.timeout(self._timeout):  # the SUBSCRIBE's write and its confirmation
                await pubsub.subscribe(channel)
                await asyncio.shield(sub.confirmed)
        except (RedisError, OSError, TimeoutError) as exc:
            self._subs.pop(channel.encode(), None)
            raise SubscriptionLost(f"could not subscribe to replies: {exc!r}") from exc
        except BaseException:  # cancelled: nobody will close it
            self._subs.pop(channel.encode(), None)
            raise
        return sub

    async def close(self, sub: Subscription) -> None:
        if self._subs.pop(sub.channel.encode(), None) is None:
            return
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                await pubsub.unsubscribe(sub.channel)
            except (RedisError, OSError) as exc:
                log.debug("unsubscribe from %s failed: %s", sub.channel, exc)
