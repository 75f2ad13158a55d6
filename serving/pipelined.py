"""Commands that go to Redis together: while one batch is on its way, the calls that come meanwhile
queue, and go in the next pipeline as one write and one round trip.

A closed loop of equal answers arrives and ends in waves (64 requests within a few milliseconds),
and each request's admission and settlement was a socket write and a round trip of its own, in a
gateway whose busiest moments are those waves. Batched this way a call alone waits for nothing (its
batch leaves on the next turn of the event loop), and calls that come together share a write, as a
worker's outbox batches its jobs' replies.

:mod:`worker.outbox` is the worker's twin of this, and stays apart: a worker may import only
``shared/`` and ``worker/``, and ``shared/`` is the contract alone. They differ where their callers
do: this one starts on its first call (a gateway has no outbox task to run), leaves unsent a call
whose caller was cancelled (an admission for a client that left is not made), and hands each
command's error back as its reply (admission tells a script error from ``NOSCRIPT`` itself); the
outbox loads the worker's scripts on ``NOSCRIPT`` and packs its batches with hiredis, at a thousand
streams' rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

Command = Sequence[Any]


@dataclass(slots=True)
class _Call:
    commands: Sequence[Command]
    done: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Pipelined:
    """One queue of calls, each a few commands whose replies it gets back together."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queue: list[_Call] = []
        self._sending: asyncio.Task[None] | None = None

    async def run(self, *commands: Command) -> list[Any]:
        """Each command's reply, in order; a command's error is its reply (an exception object, as
        a pipeline with ``raise_on_error=False`` gives it). Raises ``RedisError`` or ``OSError``
        when the batch could not be sent or read. A caller cancelled before its batch leaves is
        not sent."""
        call = _Call(commands)
        self._queue.append(call)
        sending = self._sending
        if sending is None or sending.done() or sending.get_loop() is not asyncio.get_running_loop():
            self._sending = asyncio.create_task(self._send_all(), name="redis-batch")
        return await call.done

    async def _send_all(self) -> None:
        batch: list[_Call] = []
        try:
            while self._queue:
                batch, self._queue = [c for c in self._queue if not c.done.done()], []
                if batch:
                    await self._send(batch)
        finally:  # cancelled (the process stopping): nobody waits in vain
            for call in (*batch, *self._queue):
                call.done.cancel()
            self._queue = []
            self._sending = None

    async def _send(self, batch: Sequence[_Call]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for call in batch:
                    for command in call.commands:
                        pipe.execute_command(*command)
                replies = iter(await pipe.execute(raise_on_error=False))
        except Exception as exc:
            for call in batch:
                if not call.done.done():
                    call.done.set_exception(exc)
            return
        for call in batch:
            answered = [next(replies) for _ in call.commands]
            if not call.done.done():
                call.done.set_result(answered)
