"""Sharing a model's work between its workers: the pure policy (worker.balance) by tables, then the
reads it drives against a real redis-server, two readers at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest
from redis.asyncio import Redis

from shared.messages import Job, Sampling, StreamRecord, WorkerInfo, encode
from shared.names import GROUP, JOB_FIELD, Names
from worker.balance import SHARE_GRACE, Load, Spread, level, share, stands_back
from worker.channel import Claim
from worker.inflight import Inflight
from worker.peers import Peers, peek
from worker.reader import Reader
from worker.streams import JobStreams

IDLE = Load(0, 64)


@pytest.mark.parametrize(
    ("waiting", "loads", "expected"),
    [
        (0, [Load(0, 8), Load(0, 8)], 0.0),
        (4, [Load(0, 8), Load(0, 8)], 0.25),
        (4, [Load(4, 8), Load(0, 8)], 0.5),  # the idle worker catches up first
        (6, [Load(4, 8), Load(0, 8)], 0.625),  # then both rise together
        (20, [Load(0, 16), Load(0, 64)], 0.25),  # in proportion to capacity
        (100, [Load(0, 8), Load(0, 8)], 1.0),  # more than fits: everyone full
        (3, [Load(8, 8), Load(2, 8)], 5 / 8),  # a full worker takes no part
    ],
)
def test_the_level_waiting_jobs_raise_the_fleet_to(waiting: int, loads: list[Load], expected: float) -> None:
    assert level(waiting, loads) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("waiting", "me", "peers", "expected"),
    [
        (24, IDLE, [IDLE], 12),  # a burst on two idle workers: half each
        (24, IDLE, [IDLE, IDLE, IDLE], 6),
        (24, Load(8, 64), [IDLE], 8),  # having taken 8 already, to 16 each
        (1, IDLE, [IDLE], 1),  # equal loads round up: each takes one, neither leaves it to the other
        (4, Load(30, 64), [Load(10, 64)], 0),  # above the level the others rise to
        (500, Load(60, 64), [IDLE], 4),  # more than the fleet holds: all its room
        (20, Load(0, 16), [Load(0, 64)], 4),  # in proportion to capacity
        (5, Load(64, 64), [IDLE], 0),  # full
        (7, IDLE, [], 7),  # alone: everything
        (3, IDLE, [Load(64, 64)], 3),  # the others are full
    ],
)
def test_a_workers_share_of_the_jobs_waiting(
    waiting: int, me: Load, peers: list[Load], expected: int
) -> None:
    assert share(waiting, me, peers) == expected


@pytest.mark.parametrize(
    ("me", "peers", "expected"),
    [
        (Load(24, 64), [Load(24, 64)], False),
        (Load(25, 64), [Load(23, 64)], False),  # one job above its fair share of 24 is within the slack
        (Load(26, 64), [Load(22, 64)], True),
        (Load(30, 64), [Load(18, 64), Load(24, 64)], True),
        (Load(30, 64), [Load(64, 64)], False),  # nobody else has room
        (Load(30, 64), [], False),  # alone
        (Load(8, 16), [Load(16, 64)], True),  # fair share of 24 jobs on 16 of 80 slots is 4.8
        (Load(4, 16), [Load(20, 64)], False),
    ],
)
def test_a_worker_well_above_its_fair_share_stands_back(me: Load, peers: list[Load], expected: bool) -> None:
    assert stands_back(me, peers) is expected


def test_jobs_left_for_the_others_become_anyones_after_the_grace_period() -> None:
    spread = Spread()
    assert spread.take(24, IDLE, [IDLE], now=0.0) == 12
    # The other worker did not come: the share is recomputed from the loads, then the grace ends.
    assert spread.take(12, Load(12, 64), [IDLE], now=0.1) == 0
    assert spread.take(12, Load(12, 64), [IDLE], now=SHARE_GRACE) == 12
    # Taking every job it may take (its share is all there is) leaves nothing to anyone.
    assert spread.take(2, IDLE, [Load(60, 64)], now=1.0) == 2
    assert spread.take(24, IDLE, [IDLE], now=1.1) == 12
    spread.settled()  # the rest was taken: the next jobs left start a new grace period
    assert spread.take(24, IDLE, [IDLE], now=1.1 + SHARE_GRACE) == 12


# -- against Redis -----------------------------------------------------------------------------------


async def stream_with_jobs(redis: Redis, names: Names, model: str, tenant: str, count: int) -> str:
    """A tenant's job stream, registered as gateways register it, holding ``count`` jobs."""
    stream = names.jobs_stream(model, tenant)
    for n in range(count):
        job = Job(
            id=f"{tenant}-{n}",
            tenant=tenant,
            model=model,
            prompt_token_ids=(1, 2),
            sampling=Sampling(max_tokens=1),
            created_at=time.time(),
        )
        await redis.xadd(stream, {JOB_FIELD: encode(job)})
    await redis.hset(names.streams_index(model), stream, encode(StreamRecord(tenant=tenant)))  # type: ignore[misc]
    return stream


async def test_a_peek_says_what_waits_and_what_each_worker_holds(redis: Redis) -> None:
    names = Names("balance-" + uuid.uuid4().hex[:8])
    a = await stream_with_jobs(redis, names, "m", "a", 5)
    b = await stream_with_jobs(redis, names, "m", "b", 2)
    for stream in (a, b):
        await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "w1", {a: ">"}, count=2)
    await redis.xreadgroup(GROUP, "w2", {a: ">", b: ">"}, count=1)
    loads = await peek(redis, [a, b])
    assert loads.waiting == {a: 2, b: 1}
    assert loads.held == Counter({"w1": 2, "w2": 2})


async def test_two_idle_workers_split_a_burst_already_waiting(redis: Redis) -> None:
    """The defect this policy removes: the first worker to read took a whole burst, read after
    read, before the other came round."""
    names, model = Names("balance-" + uuid.uuid4().hex[:8]), "m"
    await stream_with_jobs(redis, names, model, "t", 24)
    now = time.time()
    for worker in ("w1", "w2"):
        record = WorkerInfo(
            id=worker, model=model, tokenizer="tok", max_model_len=64, capacity=64,
            started_at=now, heartbeat_at=now,
        )  # fmt: skip
        await redis.set(names.worker(worker), encode(record))
        await redis.zadd(names.workers(), {worker: now})
    got: Counter[str] = Counter()
    hold = asyncio.Event()
    inflights = {w: Inflight(64) for w in ("w1", "w2")}

    def taker(worker: str):  # type: ignore[no-untyped-def]
        async def take(stream: str, entry_id: str, fields: dict[bytes, bytes] | None, attempt: int) -> None:
            job = Job.model_validate_json((fields or {})[JOB_FIELD.encode()])
            inflights[worker].add(Claim(stream, entry_id, job, attempt), asyncio.create_task(hold.wait()))
            got[worker] += 1

        return take

    stopping = asyncio.Event()

    def reader(w: str) -> Reader:
        streams = JobStreams(redis, names, model)
        peers = Peers(redis, names, model, w, ttl=60)
        return Reader(redis, _url(redis), w, streams, inflights[w], 0.0, taker(w), peers=peers)

    readers = [reader(w) for w in ("w1", "w2")]
    runs = [asyncio.create_task(r.run(stopping)) for r in readers]
    try:
        for _ in range(200):
            if sum(got.values()) == 24:
                break
            await asyncio.sleep(0.02)
    finally:
        stopping.set()
        await asyncio.gather(*runs)
        hold.set()
    assert got == {"w1": 12, "w2": 12}


def _url(redis: Redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
