"""Commands batched while a batch is on its way to Redis (serving/pipelined.py), on a real redis-server."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from control.processes import free_port
from serving.pipelined import Pipelined
from tests.conftest import count_pipelines


async def test_calls_made_together_share_a_pipeline_and_get_their_own_replies(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"pipelined-{uuid.uuid4().hex}"
    batch = Pipelined(redis)
    sent = count_pipelines(redis, monkeypatch)
    replies = await asyncio.gather(*(batch.run(["INCRBY", key, i], ["GET", key]) for i in range(1, 51)))
    assert sent[0] == 1
    totals = [r[0] for r in replies]
    assert totals == [sum(range(1, i + 1)) for i in range(1, 51)]  # in the order they were made
    assert all(int(got) == total for total, got in replies)
    assert await batch.run(["GET", key]) == [str(sum(range(1, 51))).encode()]  # alone: at once


async def test_calls_made_while_a_batch_is_out_go_in_the_next(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"pipelined-{uuid.uuid4().hex}"
    batch = Pipelined(redis)
    sent = count_pipelines(redis, monkeypatch)
    first = asyncio.create_task(batch.run(["INCR", key]))
    await asyncio.sleep(0)  # the first batch leaves
    later = [asyncio.create_task(batch.run(["INCR", key])) for _ in range(20)]
    await asyncio.gather(first, *later)
    assert sent[0] == 2
    assert int(await redis.get(key)) == 21


async def test_a_command_error_is_its_reply_and_spares_the_others(redis: Redis) -> None:
    key = f"pipelined-{uuid.uuid4().hex}"
    await redis.set(key, "text")
    batch = Pipelined(redis)
    bad, good = await asyncio.gather(batch.run(["INCR", key]), batch.run(["STRLEN", key]))
    assert isinstance(bad[0], ResponseError) and good == [4]


async def test_a_caller_cancelled_before_its_batch_leaves_is_not_sent(redis: Redis) -> None:
    key = f"pipelined-{uuid.uuid4().hex}"
    batch = Pipelined(redis)
    kept = asyncio.create_task(batch.run(["INCR", key]))
    dropped = asyncio.create_task(batch.run(["INCRBY", key, 100]))
    await asyncio.sleep(0)  # both queued; their batch leaves on the next turn
    dropped.cancel()
    assert await kept == [1]
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert int(await redis.get(key)) == 1


async def test_without_redis_every_caller_of_the_batch_hears_it() -> None:
    gone = Redis(port=free_port(), socket_connect_timeout=1)
    batch = Pipelined(gone)
    results = await asyncio.gather(batch.run(["PING"]), batch.run(["PING"]), return_exceptions=True)
    assert all(isinstance(r, ConnectionError | OSError) for r in results), results
    await gone.aclose()
