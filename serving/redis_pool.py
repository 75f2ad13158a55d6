"""The gateway's Redis client: a connection pool that hands out an idle connection at once.

redis-py 5.3's asyncio pool (5.x is what arq allows) checks, for every command, that the connection
it takes has nothing left unread, with a read under a zero timeout: that read suspends the command
for a turn of the event loop before it is even written. The check also runs under an
``asyncio.Lock``, so the commands of the whole process pass one by one, a loop turn each. In a
gateway answering a wave of requests a loop turn is the other requests' work (parsing, encoding,
streaming), and at 64 streams an admission's script reached Redis 24 ms on average after it was
called (p90 67 ms), measured from the job's stream entry id.

:class:`LeanPool` takes a connection without the lock (taking one is synchronous: a list pop, or a
new connection object) and checks a connected one by looking at what its reader holds, without
reading, as later redis-py releases do. A connection it cannot look into (another parser, not yet
connected, data waiting) goes through redis-py's own check, which reconnects it when needed.

The gateway's reply hub takes the replies one socket read brought from the same reader
(:func:`parsed_replies`): this module is where the gateway looks into redis-py's parser.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection


def _hiredis(connection: AbstractConnection | None) -> _AsyncHiredisParser | None:
    """The connection's parser when it is redis-py's hiredis one (the one this module looks into)."""
    parser = getattr(connection, "_parser", None)
    return parser if isinstance(parser, _AsyncHiredisParser) else None


def idle(connection: AbstractConnection) -> bool:
    """Whether ``connection`` is connected with nothing unread in its socket buffer or parser (and
    its peer has not closed it), told without reading: False when that cannot be told."""
    parser = _hiredis(connection)
    if not connection.is_connected or parser is None:
        return False
    try:
        stream, reader = parser._stream, parser._reader
        return bool(
            parser._connected
            and stream is not None
            and reader is not None
            and not stream.at_eof()
            and not stream._buffer  # type: ignore[attr-defined]
            and not reader.has_data()
        )
    except AttributeError:  # a redis-py or hiredis of another shape: let redis-py check
        return False


def parsed_replies(connection: AbstractConnection | None) -> Iterator[Any]:
    """The replies on ``connection`` that its hiredis reader holds whole already, taken without
    reading the socket (none for another parser); an error reply is raised, as redis-py would."""
    parser = _hiredis(connection)
    reader = getattr(parser, "_reader", None)
    if reader is None:
        return
    while (reply := reader.gets()) is not NOT_ENOUGH_DATA:
        if isinstance(reply, Exception):
            raise reply
        yield reply


class LeanPool(ConnectionPool):
    """A :class:`~redis.asyncio.ConnectionPool` that gives out an idle connection without a loop turn."""

    async def get_connection(
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> AbstractConnection:
        connection = self.get_available_connection()
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        if not idle(connection):
            await super().ensure_connection(connection)


def connect(url: str, **options: Any) -> Redis:
    """A client of the Redis at ``url`` (as ``Redis.from_url``) on a :class:`LeanPool`."""
    return Redis.from_pool(LeanPool.from_url(url, **options))  # closing the client closes the pool
