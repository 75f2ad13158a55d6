"""Fair pulling: how a worker splits its reads between tenant streams and priority classes.

The planner is pure; the reads run against a real redis-server, whose XREADGROUP applies COUNT to
each stream it names (the reason a single weighted read cannot favour one class over another).
"""

from __future__ import annotations

import uuid
from collections import Counter

from redis.asyncio import Redis

from shared.names import GROUP
from worker.consumer import READ_BATCH, ReadPlan, read_fairly

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
    assert got == {"a": 10 * READ_BATCH, "b": 10 * READ_BATCH, "c": 10 * READ_BATCH}


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
    assert reads[("b",)] <= READ_BATCH * BATCH // INTERACTIVE


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
