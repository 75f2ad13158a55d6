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

    async def get(self) -> bytes:
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def fail(self, error: Exception) -> None:
        """End the wait of whoever reads this subscription with ``error``."""
        self.queue.put_nowait(error)


@dataclass(eq=False)
class _Channel:
    """A channel this process listens on, for every subscription to it: two requests may follow
    one job (a stream taken up again on the gateway that lost it, a request sent again)."""

    subs: list[Subscription] = field(default_factory=list)
    confirmed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ReplyHub:
    def __init__(self, redis: Redis, control_channel: str, subscribe_timeout: float = 5.0) -> None:
        self._redis = redis
        self._control = control_channel
        self._timeout = subscribe_timeout
        self._channels: dict[bytes, _Channel] = {}
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
        listening = self._channels.get(channel)
        if listening is None:
            return
        kind = message["type"]
        if kind == "message":
            data = message["data"]
            assert isinstance(data, bytes)
            for sub in listening.subs:
                sub.queue.put_nowait(data)
        elif kind == "subscribe" and not listening.confirmed.done():
            listening.confirmed.set_result(None)

    def _fail_all(self, error: SubscriptionLost) -> None:
        for listening in self._channels.values():
            for sub in listening.subs:
                sub.queue.put_nowait(error)
            if not listening.confirmed.done():
                listening.confirmed.set_exception(error)
                listening.confirmed.exception()  # retrieved: nobody may be waiting on it
        self._channels.clear()

    async def open(self, channel: str) -> Subscription:
        """Subscribe and wait until Redis has confirmed it."""
        pubsub = self._pubsub
        if pubsub is None or not self.connected.is_set():
            raise SubscriptionLost("not connected to Redis")
        key = channel.encode()
        sub = Subscription(channel)
        listening = self._channels.get(key)
        first = listening is None
        if listening is None:
            listening = self._channels[key] = _Channel()
        listening.subs.append(sub)
        try:
            async with asyncio.timeout(self._timeout):  # the SUBSCRIBE's write and its confirmation
                if first:
                    await pubsub.subscribe(channel)
                await asyncio.shield(listening.confirmed)
        except (RedisError, OSError, TimeoutError) as exc:
            self._forget(key, sub)
            raise SubscriptionLost(f"could not subscribe to replies: {exc!r}") from exc
        except BaseException:  # cancelled: nobody will close it
            self._forget(key, sub)
            raise
        return sub

    def _forget(self, key: bytes, sub: Subscription) -> bool:
        """Drop ``sub``; True when it was the channel's last one (nobody listens there any more)."""
        listening = self._channels.get(key)
        if listening is None or sub not in listening.subs:
            return False
        listening.subs.remove(sub)
        if listening.subs:
            return False
        del self._channels[key]
        return True

    async def close(self, sub: Subscription) -> None:
        if not self._forget(sub.channel.encode(), sub):
            return
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                await pubsub.unsubscribe(sub.channel)
            except (RedisError, OSError) as exc:
                log.debug("unsubscribe from %s failed: %s", sub.channel, exc)
