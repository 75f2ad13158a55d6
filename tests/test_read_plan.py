"""Fair pulling: how a worker splits its reads between tenant streams and priority classes.

The planner is pure; the reads run against a real redis-server, whose XREADGROUP applies COUNT to
each stream it names (the reason a single weighted read cannot favour one class over another).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest
from redis.asyncio import Redis

from shared.names import GROUP
from worker.planner import Headroom, ReadPlan, fleet_shares, within
from worker.reader import READ_BLOCK_MS, read_fairly

INTERACTIVE, BATCH = 4, 1


def taken(plan: ReadPlan, weights: dict[str, int], free: int, rounds: int) -> Counter[str]:
    """Jobs each stream would give over ``rounds`` reads if every stream had an endless backlog."""
    got: Counter[str] = Counter()
    for _ in range(rounds):
        for streams, count in plan.plan(weights, free):
            for s in streams:
                got[s] += count
    return got


def test_tenants_of_one_class_get_equal_shares() -> None:
    weights = {"a": INTERACTIVE, "b": INTERACTIVE, "c": INTERACTIVE}
    got = taken(ReadPlan(), weights, free=256, rounds=10)
    assert got == {"a": 10 * 85, "b": 10 * 85, "c": 10 * 85}  # a third of the room each, every read


def test_a_tenant_alone_takes_all_the_room_in_one_read() -> None:
    # A burst of equal jobs (their predecessors ended together) starts in one read, not in many.
    assert ReadPlan().plan({"a": INTERACTIVE}, free=64) == [(["a"], 64)]


def test_interactive_gets_four_jobs_for_each_batch_job_with_plenty_of_room() -> None:
    got = taken(ReadPlan(), {"i": INTERACTIVE, "b": BATCH}, free=256, rounds=40)
    assert got["i"] == 4 * got["b"] > 0


def test_the_ratio_holds_when_the_worker_has_room_for_one_job_at_a_time() -> None:
    # One job per read: the batch class is due every fourth read, not every read.
    got = taken(ReadPlan(), {"i": INTERACTIVE, "b": BATCH}, free=1, rounds=100)
    assert got == {"i": 100, "b": 25}


def test_an_idle_class_does_not_bank_credit_for_a_later_burst() -> None:
    plan = ReadPlan()
    for _ in range(50):  # batch streams exist but the read plan only ever gives them their share
        plan.plan({"i": INTERACTIVE, "b": BATCH}, free=256)
    reads = dict((tuple(s), c) for s, c in plan.plan({"i": INTERACTIVE, "b": BATCH}, free=256))
    assert reads[("b",)] <= 256 * BATCH // (INTERACTIVE + BATCH)  # its share of one read


def test_reads_never_ask_for_far_more_than_the_room_left() -> None:
    weights = {f"t{i}": INTERACTIVE for i in range(4)}
    reads = ReadPlan().plan(weights, free=8)
    assert sum(len(s) * c for s, c in reads) <= 8


async def test_reads_from_redis_follow_the_weights(redis: Redis) -> None:
    prefix = f"syread{uuid.uuid4().hex[:8]}"
    interactive, batch = f"{prefix}:i", f"{prefix}:b"
    try:
        for stream in (interactive, batch):
            await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            for n in range(200):
                await redis.xadd(stream, {"n": n})
        plan, got = ReadPlan(), Counter[str]()
        weights = {interactive: INTERACTIVE, batch: BATCH}
        for _ in range(20):
            for stream, _, _ in await read_fairly(redis, "w", plan.plan(weights, 2), list(weights)):
                got[stream] += 1
        assert got[interactive] == 4 * got[batch] > 0, got

        # With the interactive stream drained, the batch tenant gets every job there is (the
        # weights share contention, they do not idle a worker).
        await redis.xtrim(interactive, maxlen=0)
        before = got[batch]
        for _ in range(5):
            for stream, _, _ in await read_fairly(redis, "w", plan.plan(weights, 2), list(weights)):
                got[stream] += 1
        assert got[batch] - before >= 5
    finally:
        await redis.delete(interactive, batch)


async def test_a_blocking_read_on_its_own_client_ends_at_client_unblock(redis: Redis) -> None:
    """How a worker whose flooding stream is held back notices that one of its jobs ended: the read
    blocked on the other streams is cut short, not left to run its READ_BLOCK_MS."""
    stream = f"syread{uuid.uuid4().hex[:8]}:quiet"
    blocking = redis.__class__(connection_pool=redis.connection_pool, single_connection_client=True)
    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        client_id = await blocking.client_id()
        started = time.monotonic()
        read = asyncio.create_task(read_fairly(redis, "w", [([stream], 1)], [stream], blocking=blocking))
        await asyncio.sleep(0.05)
        assert not read.done()  # blocked: nothing to read
        assert await redis.client_unblock(client_id) == 1
        assert await read == []
        assert time.monotonic() - started < READ_BLOCK_MS / 1000 - 0.1
        # Unblocked, the same client goes on serving blocking reads: a job that arrives ends the next.
        read = asyncio.create_task(read_fairly(redis, "w", [([stream], 1)], [stream], blocking=blocking))
        await asyncio.sleep(0.05)
        await redis.xadd(stream, {"n": 1})
        assert [entry[0] for entry in await read] == [stream]
    finally:
        await blocking.aclose()
        await redis.delete(stream)


def test_a_flood_alone_may_use_every_slot() -> None:
    room = Headroom(window=10, capacity=16)
    held = Counter({"a": 10})
    room.update(held, now=0.0)
    assert room.room(["a"], held, free=6) == {"a": 6}


def test_a_flood_leaves_the_room_an_active_tenant_used_lately() -> None:
    room = Headroom(window=10, capacity=16)
    room.update(Counter({"a": 16}), now=0.0)
    # The flood's wave ends; the other tenant's first job is read along with the flood's next ones.
    held = Counter({"a": 12, "b": 1})
    room.update(held, now=1.0)
    assert room.room(["a", "b"], held, free=3) == {"a": 3, "b": 3}  # b has used one slot so far
    held = Counter({"a": 13, "b": 3})  # b got two more when slots freed up
    room.update(held, now=2.0)
    # b's jobs end and its clients send the next ones: the slots it used wait for them.
    held = Counter({"a": 13, "b": 0})
    room.update(held, now=3.0)
    assert room.room(["a", "b"], held, free=3) == {"b": 3}


def test_the_room_kept_for_others_is_at_most_a_quarter_and_expires() -> None:
    room = Headroom(window=10, capacity=16)
    held = Counter({"a": 4, "b": 6, "c": 6})
    room.update(held, now=0.0)
    # b and c used 12 slots: a flood by a would still get three quarters of the worker.
    assert room.room(["a"], Counter({"b": 0, "c": 0}), free=16) == {"a": 12}
    quiet: Counter[str] = Counter()
    room.update(quiet, now=5.0)
    assert room.room(["a"], quiet, free=16) == {"a": 12}  # quiet for less than the window
    room.update(quiet, now=10.5)
    assert room.room(["a"], quiet, free=16) == {"a": 16}  # gone quiet: their room is given back
    assert Headroom(window=0, capacity=16).room(["a"], quiet, free=16) == {"a": 16}  # 0: off


def test_room_is_kept_for_the_same_or_a_higher_priority_class_only() -> None:
    room = Headroom(window=10, capacity=16)
    room.update(Counter({"i": 2, "b": 2}), now=0.0)  # an interactive and a batch tenant, active
    held = Counter({"f": 12})
    # An interactive flood keeps room for the interactive tenant only: 16 - 2 - 12.
    interactive = {"i": INTERACTIVE, "b": BATCH, "f": INTERACTIVE}
    assert room.room(["f"], held, free=4, weights=interactive) == {"f": 2}
    # A batch flood keeps room for both: 16 - (2 + 2) - 12 leaves it none.
    batch = {"i": INTERACTIVE, "b": BATCH, "f": BATCH}
    assert room.room(["f"], held, free=4, weights=batch) == {}


def test_reads_never_ask_a_stream_for_more_than_its_room() -> None:
    reads = within([(["a", "b", "c"], 4), (["d"], 1)], {"a": 1, "b": 8, "c": 4, "d": 2})
    assert reads == [(["b", "c"], 4), (["a"], 1), (["d"], 1)]


@pytest.mark.parametrize(
    ("pending", "capacity", "fleet", "expected"),
    [
        ({"a": 48, "b": 16}, 16, 64, {"a": 12, "b": 4}),  # four equal workers: a quarter each
        ({"a": 48, "b": 1}, 16, 64, {"a": 12, "b": 1}),  # rounded up: one job keeps one slot
        ({"a": 10, "b": 0}, 16, 16, {"a": 10}),  # alone: what it holds
        ({"a": 30}, 48, 64, {"a": 23}),  # a bigger worker, a bigger share
        ({"a": 5}, 16, 0, {}),
    ],
)
def test_a_streams_share_of_the_fleets_jobs(
    pending: dict[str, int], capacity: int, fleet: int, expected: dict[str, int]
) -> None:
    assert fleet_shares(pending, capacity, fleet) == Counter(expected)


def test_in_a_fleet_room_is_kept_for_a_tenant_whose_jobs_ran_on_other_workers() -> None:
    """Measured with four simulated workers: kept by each worker's own history, a tenant's jobs
    went to the workers that happened to have run one lately; the flood took every slot of the
    others, and the tenant's next jobs waited up to 0.8 s for the flood's to end."""
    room = Headroom(window=10, capacity=16)
    local = Counter({"flood": 16})  # this worker has not run any of b's jobs lately
    room.update(local, now=0.0)
    assert room.room(["flood", "b"], Counter({"flood": 12}), free=4) == {"flood": 4, "b": 4}
    room = Headroom(window=10, capacity=16)
    room.update(fleet_shares({"flood": 48, "b": 16}, 16, 64), now=0.0)  # b runs 16 jobs elsewhere
    assert room.room(["flood", "b"], Counter({"flood": 12}), free=4) == {"b": 4}
