"""One connection that carries every Redis write of a worker's jobs, batched.

With dozens of jobs streaming at once, publishing each job's tokens on its own round trip costs a
socket write and a pooled connection per message. The outbox sends whatever all jobs queued while
the previous batch was in flight as one pipeline: one write, one read, in FIFO order — so a job's
final message and its XACK still follow its tokens.

Each batch is packed into one buffer by hiredis (C) and written on a connection of the client's pool,
and its replies are parsed by the connection's hiredis reader as the bytes come: redis-py's
pipeline packs every argument in Python and wraps each command in objects of its own, and its
``read_response`` costs a few coroutine calls per reply, which at a thousand streams cost the
worker more than the rest of its publishing.

Scripts are called by SHA1; when Redis answers ``NOSCRIPT`` (it started, or restarted, without
them) the outbox loads them and sends those calls again, in their order, before anything else:
a call that met ``NOSCRIPT`` did not run.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hiredis import pack_command
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.scripts import (
    WORKER_SCRIPTS,
    Lua,
    is_claimed_publish,
    is_noscript,
    merge_publishes,
    mergeable_publishes,
)

log = logging.getLogger(__name__)

Command = tuple[Any, ...]


@dataclass(eq=False)
class _Batch:
    commands: Sequence[Command]
    done: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Outbox:
    def __init__(self, redis: Redis, scripts: Sequence[Lua] = WORKER_SCRIPTS, max_batch: int = 512) -> None:
        self._redis = redis
        self._scripts = scripts
        self._max_batch = max_batch
        self._queue: deque[_Batch] = deque()
        self._wake = asyncio.Event()
        self._stopped = False

    async def send(self, *commands: Command) -> list[Any]:
        """Queue commands (e.g. ``("PUBLISH", channel, data)``) and wait for their replies."""
        if self._stopped:  # nobody would ever send them: fail now rather than wait forever
            raise _stopped()
        batch = _Batch(commands)
        self._queue.append(batch)
        self._wake.set()
        return await batch.done

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    taken, size = [], 0
                    while self._queue and size < self._max_batch:
                        batch = self._queue.popleft()
                        taken.append(batch)
                        size += len(batch.commands)
                    await self._flush(taken)
        finally:
            self._stopped = True
            _fail(list(self._queue), _stopped())  # nobody will send these: their senders must not wait
            self._queue.clear()

    async def _flush(self, batches: list[_Batch]) -> None:
        commands = [command for batch in batches for command in batch.commands]
        try:
            replies = await self._execute(commands)
            missing = [i for i, reply in enumerate(replies) if is_noscript(reply)]
            if missing and self._scripts:
                for script in self._scripts:
                    await self._redis.script_load(script.text)
                again = await self._execute([commands[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except (RedisError, OSError) as exc:
            _fail(batches, exc)
            return
        except asyncio.CancelledError:  # the outbox stops mid-batch: its senders must not wait forever
            _fail(batches, _stopped())
            raise
        except Exception as exc:  # a command it cannot send (a bad argument): its senders hear of it
            log.exception("the worker's outbox could not send a batch")
            _fail(batches, exc)
            return
        offset = 0
        for batch in batches:
            mine = replies[offset : offset + len(batch.commands)]
            offset += len(batch.commands)
            if batch.done.done():  # its sender was cancelled meanwhile
                continue
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is not None:
                batch.done.set_exception(error)
            else:
                batch.done.set_result(mine)

    async def _execute(self, commands: list[Command]) -> list[Any]:
        """Every command's reply, in order, as redis-py gives it; a command Redis refused has its
        error as its reply."""
        sent, counts = _merged(commands)
        packed = b"".join([pack_command(command) for command in sent])
        pool = self._redis.connection_pool
        connection = await pool.get_connection()
        try:  # an error or cancellation mid-way disconnects it: no reply is left unread
            await connection.send_packed_command(packed)
            received = await _read_replies(connection, len(sent))
        finally:
            await pool.release(connection)
        replies: list[Any] = []
        callbacks = self._redis.response_callbacks
        for command, count, reply in zip(sent, counts, received, strict=True):
            if count:  # merged publishes: each call's own result, as its own call would have had it
                if isinstance(reply, ResponseError):  # the call as a whole did not run (NOSCRIPT)
                    replies += [reply] * count
                else:  # a job's own error comes as its entry of the list
                    replies += [r if isinstance(r, ResponseError) else [r] for r in reply]
            elif (callback := callbacks.get(command[0])) is not None and not isinstance(reply, ResponseError):
                replies.append(callback(reply))
            else:
                replies.append(reply)
        return replies


MERGED_PUBLISHES = 64
"""The most jobs' publishes one script call carries: a script holds Redis for its whole run."""


def _merged(commands: list[Command]) -> tuple[list[Command], list[int]]:
    """``commands`` with each run of consecutive one-job publishes as one call of the script
    (fewer bytes, one script run and one reply for many jobs), and per command sent how many calls
    it merged (0: sent as it was)."""
    sent: list[Command] = []
    counts: list[int] = []
    run: list[Command] = []

    def close_run() -> None:
        if len(run) == 1:
            sent.append(run[0])
            counts.append(0)
        elif run:
            sent.append(merge_publishes(run))
            counts.append(len(run))
        run.clear()

    for command in commands:
        if is_claimed_publish(command):
            if run and (len(run) == MERGED_PUBLISHES or not mergeable_publishes(run[0], command)):
                close_run()
            run.append(command)
        else:
            close_run()
            sent.append(command)
            counts.append(0)
    close_run()
    return sent, counts


def _stopped() -> RedisError:
    return RedisError("the worker's outbox stopped")


def _fail(batches: list[_Batch], error: BaseException) -> None:
    for batch in batches:
        if not batch.done.done():
            batch.done.set_exception(error)


async def _read_replies(connection: AbstractConnection, count: int) -> list[Any]:
    """The next ``count`` replies on ``connection``; a command Redis refused has its error
    (a :class:`ResponseError`) as its reply. Parsed by the connection's hiredis reader straight
    from the bytes received, a C call per reply; another parser is read reply by reply."""
    parser = connection._parser
    reader = getattr(parser, "_reader", None)
    if not isinstance(parser, _AsyncHiredisParser) or reader is None:
        return [await _read_one(connection) for _ in range(count)]
    replies: list[Any] = []
    try:
        async with asyncio.timeout(connection.socket_timeout):  # the client's, for the batch
            while len(replies) < count:
                reply = reader.gets()
                if reply is NOT_ENOUGH_DATA:
                    await parser.read_from_socket()
                elif isinstance(reply, ConnectionError):
                    raise reply
                else:
                    replies.append(reply)
    except BaseException as exc:
        # As redis-py does when a read fails or is cancelled: what is left of the replies must
        # not be read as the answers of the connection's next commands.
        await connection.disconnect(nowait=True)
        if isinstance(exc, TimeoutError):
            raise RedisTimeoutError("Timeout reading from Redis") from exc
        if isinstance(exc, OSError):
            raise ConnectionError(f"Error while reading from Redis: {exc}") from exc
        raise
    return replies


async def _read_one(connection: AbstractConnection) -> Any:
    try:
        return await connection.read_response()
    except ResponseError as exc:  # read in full: the next reply follows
        return exc
