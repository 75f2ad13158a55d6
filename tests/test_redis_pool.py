"""The gateway's Redis pool against a real redis-server: an idle connection comes without a turn of
the event loop, and one that is not idle (a reply left unread, closed by the server) is never
handed out as it is."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from control.redis_server import EmbeddedRedis
from serving.redis_pool import LeanPool, connect, idle


@pytest_asyncio.fixture
async def client(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    r = connect(redis_server.url)
    yield r
    await r.aclose()


def pool_of(client: Redis) -> LeanPool:
    pool = client.connection_pool
    assert isinstance(pool, LeanPool)
    return pool


async def no_longer_idle(connection: AbstractConnection) -> bool:
    """Whether ``connection`` stops being idle within a second (what Redis sent it has arrived)."""
    for _ in range(200):
        if not idle(connection):
            return True
        await asyncio.sleep(0.005)
    return False


async def test_an_idle_connection_is_handed_out_without_a_turn_of_the_event_loop(
    client: Redis, redis_server: EmbeddedRedis
) -> None:
    assert await client.ping()
    pool = pool_of(client)
    taking = pool.get_connection()
    with pytest.raises(StopIteration) as done:  # finished on its first step: it never waited
        taking.send(None)
    connection = done.value.value
    assert idle(connection)
    await pool.release(connection)
    # The stock pool, for contrast, suspends the same call for its check.
    stock = Redis.from_url(redis_server.url)
    try:
        assert await stock.ping()
        waiting = stock.connection_pool.get_connection()
        waiting.send(None)  # suspended, not done
        waiting.close()
    finally:
        await stock.aclose()


async def test_a_connection_with_a_reply_left_unread_is_not_reused_as_it_is(client: Redis) -> None:
    key = "pool-" + uuid.uuid4().hex
    await client.set(key, "value")
    pool = pool_of(client)
    connection = await pool.get_connection()
    await connection.send_command("PING")  # its reply never read, as after a command cut short
    assert await no_longer_idle(connection)
    await pool.release(connection)
    # The next command gets the right answer, not the PONG waiting on that connection.
    assert await client.get(key) == b"value"


async def test_a_connection_the_server_closed_is_replaced(client: Redis, redis: Redis) -> None:
    assert await client.ping()
    pool = pool_of(client)
    connection = await pool.get_connection()
    await connection.send_command("CLIENT", "ID")
    own_id = int(await connection.read_response())
    await pool.release(connection)
    assert await redis.client_kill_filter(_id=str(own_id)) == 1
    assert await no_longer_idle(connection)
    assert await client.ping()
    assert await client.client_id() != own_id


async def test_many_commands_at_once_each_get_their_own_reply(client: Redis) -> None:
    key = "pool-" + uuid.uuid4().hex
    replies = await asyncio.gather(*(client.incr(key) for _ in range(300)))
    assert sorted(replies) == list(range(1, 301))
