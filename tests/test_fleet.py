"""The one reader of the fleet's state (shared.fleet) against a real redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from redis.asyncio import Redis

from serving.registry import ModelEntry, WorkerRegistry
from shared.fleet import gather, is_live, live_workers, worker_records
from shared.messages import StreamRecord, WorkerInfo, encode
from shared.names import Names


def info(worker: str, beat: float, model: str = "m") -> WorkerInfo:
    return WorkerInfo(
        id=worker,
        model=model,
        tokenizer="tok",
        max_model_len=512,
        capacity=8,
        started_at=beat - 100,
        heartbeat_at=beat,
    )


async def beat(redis: Redis, names: Names, record: WorkerInfo | bytes, worker: str, at: float) -> None:
    await redis.set(names.worker(worker), encode(record) if isinstance(record, WorkerInfo) else record)
    await redis.zadd(names.workers(), {worker: at})


def test_one_definition_of_live() -> None:
    now = 1000.0
    assert is_live(info("w", now - 10), now, ttl=10)
    assert not is_live(info("w", now - 10.5), now, ttl=10)


async def test_every_reader_skips_a_record_it_cannot_decode(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    names = Names("fleet-" + uuid.uuid4().hex[:8])
    now = time.time()
    await beat(redis, names, info("good", now), "good", now)
    await beat(redis, names, b"{garbage", "bad", now)
    await beat(redis, names, info("stale", now - 60), "stale", now - 60)
    assert [w.id for w in await worker_records(redis, names)] == ["stale", "good"]
    assert [w.id for w in await live_workers(redis, names, ttl=10)] == ["good"]
    snap = await gather(redis, names, worker_ttl=10)
    assert {(w.id, w.live) for w in snap.workers} == {("good", True), ("stale", False)}
    caplog.clear()
    registry = WorkerRegistry(redis, names, worker_ttl=10, cache_seconds=0)
    for _ in range(3):  # a poller logs a bad record once, not at every read
        assert list(await registry.models()) == ["m"]
    assert sum("skipping" in r.getMessage() and ":bad" in r.getMessage() for r in caplog.records) == 1


async def test_requests_arriving_together_share_one_read_of_the_fleet(redis: Redis) -> None:
    names = Names("fleet-" + uuid.uuid4().hex[:8])
    now = time.time()
    await beat(redis, names, info("w1", now), "w1", now)

    class Counted(WorkerRegistry):
        reads = 0

        async def _read(self) -> dict[str, ModelEntry]:
            Counted.reads += 1
            return await super()._read()

    registry = Counted(redis, names, worker_ttl=10, cache_seconds=60)
    answers = await asyncio.gather(*(registry.models() for _ in range(64)))
    assert Counted.reads == 1 and all(list(a) == ["m"] for a in answers)


async def test_a_model_whose_worker_joined_within_the_cache_period_is_found_at_once(redis: Redis) -> None:
    names = Names("fleet-" + uuid.uuid4().hex[:8])
    now = time.time()
    await beat(redis, names, info("w1", now), "w1", now)
    registry = WorkerRegistry(redis, names, worker_ttl=10, cache_seconds=60)
    assert list(await registry.models()) == ["m"]
    await beat(redis, names, info("w2", now, model="new"), "w2", now)
    assert list(await registry.models()) == ["m"]  # the cache, for a model it knows
    found = await registry.find("new")
    assert found is not None and found.name == "new"
    assert await registry.find("nobody-serves") is None


async def test_a_streams_tenant_comes_from_its_record(redis: Redis) -> None:
    names = Names("fleet-" + uuid.uuid4().hex[:8])
    stream = names.jobs_stream("m", "acme")
    await redis.xadd(stream, {"job": "{}"})
    await redis.hset(names.streams_index("m"), stream, encode(StreamRecord(tenant="acme", priority="batch")))
    await redis.hset(names.models(), "m", b"{}")
    snap = await gather(redis, names)
    assert [(s.tenant, s.priority, s.backlog) for s in snap.streams] == [("acme", "batch", 1)]
