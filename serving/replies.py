"""One pub/sub connection per gateway process, shared by every request in flight.

Each request listens on its own reply channel, confirmed by Redis before its job is enqueued, so no
reply can be published before someone listens. The jobs a process enqueues itself have ids that
begin with its own tag (:func:`own_request_prefix`), and one pattern subscription, made when the
connection opens, covers all their channels: such a request subscribes to nothing and unsubscribes
from nothing. A channel outside it (a stream taken up from another gateway) is subscribed to on its
own. A lost connection fails every open subscription at once (clients get an error, never a hang);
the hub then reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from serving.redis_pool import parsed_replies
from shared.names import Names

log = logging.getLogger(__name__)


_tag: tuple[int, str] | None = None


def own_request_prefix() -> str:
    """How the ids of the jobs this process enqueues begin: its own tag, drawn once per process
    (a forked child draws its own), so that its hub's one pattern subscription covers them."""
    global _tag
    if _tag is None or _tag[0] != os.getpid():
        _tag = (os.getpid(), secrets.token_hex(4))
    return f"req_{_tag[1]}"


_DATA = (b"message", b"pmessage")


def glob_escape(text: str) -> str:
    """``text`` as a Redis glob pattern that matches only itself."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


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
    def __init__(
        self, redis: Redis, control_channel: str, subscribe_timeout: float = 5.0, own: str | None = None
    ) -> None:
        """``own``: how the reply channels of the jobs this process enqueues begin (see
        :func:`own_request_prefix`); None: every channel is subscribed to on its own."""
        self._redis = redis
        self._control = control_channel
        self._own = own
        self._timeout = subscribe_timeout
        self._channels: dict[bytes, _Channel] = {}
        self._pubsub: PubSub | None = None
        self.connected = asyncio.Event()

    @classmethod
    def for_process(cls, redis: Redis, names: Names) -> ReplyHub:
        """The hub of a process that enqueues jobs with :func:`serving.path.new_request_id`: its own
        jobs' channels under one pattern."""
        return cls(redis, names.hub_channel(), own=names.reply_channel(own_request_prefix()))

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
            if self._own is not None:  # confirmed before the control channel below
                await pubsub.psubscribe(glob_escape(self._own) + "*")
            # A standing subscription keeps the connection in subscribed mode, so reads block.
            await pubsub.subscribe(self._control)
            self._pubsub = pubsub
            while True:
                self._take(await pubsub.get_message(timeout=None))
                # The replies that came in the same read are parsed already: deliver them without
                # redis-py's per-message wrapping (its read path and message dict), which costs
                # more than the delivery itself when thousands of token messages arrive a second.
                for reply in parsed_replies(pubsub.connection):
                    if reply[0] in _DATA:  # [b"message", channel, data], or with the pattern first
                        self._deliver(reply[-2], reply[-1])
                    else:  # (un)subscribe confirmations and pongs: redis-py keeps its state
                        self._take(await pubsub.handle_message(reply))
        finally:
            self._pubsub = None
            await pubsub.aclose()

    def _take(self, message: dict[str, object] | None) -> None:
        if message is None:
            return
        self._dispatch(message)
        if message["type"] == "subscribe" and message.get("channel") == self._control.encode():
            self.connected.set()

    def _dispatch(self, message: dict[str, object]) -> None:
        channel = message.get("channel")
        if not isinstance(channel, bytes):  # a pong (redis-py's health check): no channel's
            return
        kind = message["type"]
        if kind == "message" or kind == "pmessage":
            data = message["data"]
            assert isinstance(data, bytes)
            self._deliver(channel, data)
        elif kind == "subscribe":
            listening = self._channels.get(channel)
            if listening is not None and not listening.confirmed.done():
                listening.confirmed.set_result(None)

    def _deliver(self, channel: bytes, data: bytes) -> None:
        listening = self._channels.get(channel)
        if listening is not None:
            for sub in listening.subs:
                sub.queue.put_nowait(data)

    def _fail_all(self, error: SubscriptionLost) -> None:
        for listening in self._channels.values():
            for sub in listening.subs:
                sub.queue.put_nowait(error)
            if not listening.confirmed.done():
                listening.confirmed.set_exception(error)
                listening.confirmed.exception()  # retrieved: nobody may be waiting on it
        self._channels.clear()

    def listening(self) -> int:
        """How many reply channels someone in this process follows now."""
        return len(self._channels)

    def _owns(self, channel: str) -> bool:
        return self._own is not None and channel.startswith(self._own)

    async def open(self, channel: str) -> Subscription:
        """Subscribe and wait until Redis has confirmed it (a channel of this process's own jobs:
        the pattern subscription, confirmed when the connection opened, covers it already)."""
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
        if self._owns(channel):
            return sub
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
        if not self._forget(sub.channel.encode(), sub) or self._owns(sub.channel):
            return
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                await pubsub.unsubscribe(sub.channel)
            except (RedisError, OSError) as exc:
                log.debug("unsubscribe from %s failed: %s", sub.channel, exc)


class WaitExpired(Exception):
    """A wait for a reply lasted its whole budget (``why``: what the budget was for)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class Alarm:
    """Waits on a subscription, each failed with :class:`WaitExpired` once it has lasted its budget,
    on one timer rather than a timeout per wait. A wait that ends in time leaves the timer armed
    for the next one: it is only moved when it fires (the wait then in progress, if any, may have
    time left) or when a wait must end sooner than it is set for."""

    __slots__ = ("_at", "_handle", "_sub", "_until", "_why")

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf
        """When the timer fires (``time.monotonic()``)."""
        self._until: float | None = None
        """When the wait in progress ends, None between waits."""
        self._why = ""

    def waiting(self, until: float, why: str) -> None:
        self._until, self._why = until, why
        if until < self._at:
            self._arm(until)

    def done(self) -> None:
        self._until = None

    def cancel(self) -> None:
        self._until = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle, self._at = None, math.inf

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = at
        self._handle = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._handle, self._at = None, math.inf
        until = self._until
        if until is None:
            return  # between waits: the next wait arms it again
        if time.monotonic() < until or not self._sub.queue.empty():
            self._arm(until)  # this wait began after the timer was set, or a reply just came
            return
        self._until = None
        self._sub.fail(WaitExpired(self._why))
