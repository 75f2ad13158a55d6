"""Prefix affinity: the routing as tables (pure), the digest a gateway puts on jobs, and the
hand-over between two workers against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest_asyncio
from redis.asyncio import Redis

from serving.path import prefix_digest
from shared.messages import Job, Sampling, encode
from shared.names import GROUP, JOB_FIELD, Names
from shared.tenants import Tenant, cache_salt
from worker.handover import SPARE, hand_over, receive
from worker.outbox import Outbox
from worker.prefix_affinity import SLACK, Peer, hand_to, preferred


@pytest_asyncio.fixture
async def outbox(redis: Redis) -> AsyncIterator[Outbox]:
    """A worker's outbox, running: what hands jobs over."""
    box = Outbox(redis)
    task = asyncio.create_task(box.run())
    try:
        yield box
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_equal_prompts_of_tenants_that_share_no_cache_have_different_digests() -> None:
    """A digest names a prefix in one cache: two tenants' equal prompts sit in different caches
    (their salts differ), so they need not meet on one worker, and no timing can tell one tenant
    where the other's prompts went."""
    a, b = Tenant(name="a"), Tenant(name="b")
    grouped = [Tenant(name=n, cache_group="team") for n in ("c", "d")]
    salts = {t.name: cache_salt(t, "tenant") for t in (a, b, *grouped)}
    assert len({salts["a"], salts["b"], salts["c"]}) == 3 and salts["c"] == salts["d"]
    assert all(s and len(s) <= 128 and not set(s) & set("@/\\\0") for s in salts.values())
    assert cache_salt(a, "shared") is None and cache_salt(grouped[0], "shared") is None
    prompt = list(range(100))
    digests = {name: prefix_digest(prompt, 64, salt) for name, salt in salts.items()}
    assert digests["a"] != digests["b"] and digests["c"] == digests["d"] != digests["a"]
    assert prefix_digest(prompt, 64, None) == prefix_digest(prompt, 64)
    again = Tenant(name="a")  # the name given anew is another tenant: another cache
    assert cache_salt(again, "tenant") != salts["a"]


def test_a_conversation_keeps_its_digest_and_short_prompts_have_none() -> None:
    turn1 = list(range(100))
    turn2 = [*turn1, 7, 7, 7, 500, 501]  # the first turn, its answer, the next question
    assert prefix_digest(turn1, 64) == prefix_digest(turn2, 64) is not None
    assert prefix_digest([9, *turn1], 64) != prefix_digest(turn1, 64)
    assert prefix_digest(list(range(64)), 64) is None  # not longer than the prefix: nothing to share
    assert prefix_digest(turn1, 0) is None  # off


def test_digests_spread_over_workers_and_keep_their_worker_when_another_joins() -> None:
    digests = [f"{i:016x}" for i in range(3000)]
    three = {d: preferred(d, ["w1", "w2", "w3"]) for d in digests}
    shares = Counter(three.values())
    assert all(800 < n < 1200 for n in shares.values()), shares
    four = {d: preferred(d, ["w1", "w2", "w3", "w4"]) for d in digests}
    moved = [d for d in digests if four[d] != three[d]]
    assert all(four[d] == "w4" for d in moved)  # only what the new worker takes moves
    assert 500 < len(moved) < 1000
    assert preferred("ab", ["w3", "w1", "w2"]) == preferred("ab", ["w1", "w2", "w3"])  # order-free


def test_a_job_goes_to_its_worker_while_that_one_has_room() -> None:
    digest = next(d for d in (f"{i:x}" for i in range(100)) if preferred(d, ["me", "other"]) == "other")
    mine = next(d for d in (f"{i:x}" for i in range(100)) if preferred(d, ["me", "other"]) == "me")
    idle = Peer("other", inflight=0, capacity=8)
    assert hand_to(mine, "me", 0, [idle]) is None  # its own
    assert hand_to(digest, "me", 0, [idle]) == idle
    near = Peer("other", inflight=SLACK, capacity=8)
    assert hand_to(digest, "me", 0, [near]) == near
    assert hand_to(digest, "me", 0, [Peer("other", inflight=SLACK + 1, capacity=64)]) is None  # busier
    assert hand_to(digest, "me", 10, [Peer("other", inflight=8, capacity=8)]) is None  # full
    assert hand_to(digest, "me", 0, []) is None  # alone: nobody to hand it to


async def test_a_handed_job_reaches_its_worker_without_counting_as_a_delivery(
    redis: Redis, outbox: Outbox
) -> None:
    names = Names(f"syaff{uuid.uuid4().hex[:8]}")
    stream = names.jobs_stream("m", "t")
    job = Job(
        id="req_" + uuid.uuid4().hex, tenant="t", model="m", prompt_token_ids=(1, 2),
        sampling=Sampling(max_tokens=2), created_at=time.time(), affinity="abc",
    )  # fmt: skip
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await redis.xadd(stream, {JOB_FIELD: encode(job)})
    ((_, [(entry, _)]),) = await redis.xreadgroup(GROUP, "giver", {stream: ">"}, count=1)
    taken: asyncio.Queue[tuple[str, str, dict[bytes, bytes] | None]] = asyncio.Queue()

    async def take(s: str, e: str, fields: dict[bytes, bytes] | None) -> None:
        await taken.put((s, e, fields))

    stopping = asyncio.Event()
    inbox = asyncio.create_task(receive(redis, names, "taker", stopping, take))
    try:
        await asyncio.sleep(0.2)  # subscribed
        taker = Peer("taker", inflight=0, capacity=1 + SPARE)
        assert await hand_over(outbox, names, (stream, entry.decode()), [stream], taker, "giver")
        s, e, fields = await asyncio.wait_for(taken.get(), 5)
        assert (s, e) == (stream, entry.decode()) and fields is not None and fields[JOB_FIELD.encode()]
        (pending,) = await redis.xpending_range(stream, GROUP, min="-", max="+", count=10)
        assert pending["consumer"] == b"taker" and pending["times_delivered"] == 1
    finally:
        stopping.set()
        inbox.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await inbox
        await redis.delete(stream)


async def test_a_job_handed_to_a_worker_not_listening_comes_back_to_its_giver(
    redis: Redis, outbox: Outbox
) -> None:
    names = Names(f"syaff{uuid.uuid4().hex[:8]}")
    stream = names.jobs_stream("m", "t")
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await redis.xadd(stream, {JOB_FIELD: b"{}"})
    ((_, [(entry, _)]),) = await redis.xreadgroup(GROUP, "giver", {stream: ">"}, count=1)
    try:
        # "starting" has no inbox subscription yet: the job must not wait for reclaim_idle under it
        starting = Peer("starting", 0, 4)
        assert not await hand_over(outbox, names, (stream, entry.decode()), [stream], starting, "giver")
        (pending,) = await redis.xpending_range(stream, GROUP, min="-", max="+", count=10)
        assert pending["consumer"] == b"giver" and pending["times_delivered"] == 1
    finally:
        await redis.delete(stream)


async def test_a_job_is_not_handed_to_a_worker_about_to_be_full(redis: Redis, outbox: Outbox) -> None:
    """The taker's heartbeat said it had room; its pending entries, in every stream of the model,
    say it has only the slot its own next read takes: the job stays with the giver, and nothing is
    published to the taker."""
    names = Names(f"syaff{uuid.uuid4().hex[:8]}")
    mine, other = names.jobs_stream("m", "t"), names.jobs_stream("m", "u")
    for stream in (mine, other):
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for _ in range(2):
        await redis.xadd(other, {JOB_FIELD: b"{}"})
    await redis.xadd(mine, {JOB_FIELD: b"{}"})
    await redis.xreadgroup(GROUP, "taker", {other: ">"}, count=2)  # the taker runs two jobs
    ((_, [(entry, _)]),) = await redis.xreadgroup(GROUP, "giver", {mine: ">"}, count=1)
    pubsub = redis.pubsub()
    await pubsub.subscribe(names.inbox("taker"))
    try:
        await pubsub.get_message(timeout=1)  # the subscription's confirmation
        full = Peer("taker", inflight=1, capacity=2 + SPARE)  # a beat-old heartbeat
        assert not await hand_over(outbox, names, (mine, entry.decode()), [mine, other], full, "giver")
        (pending,) = await redis.xpending_range(mine, GROUP, min="-", max="+", count=10)
        assert pending["consumer"] == b"giver"
        assert await pubsub.get_message(timeout=0.2) is None
        roomy = Peer("taker", inflight=1, capacity=3 + SPARE)
        assert await hand_over(outbox, names, (mine, entry.decode()), [mine, other], roomy, "giver")
        (pending,) = await redis.xpending_range(mine, GROUP, min="-", max="+", count=10)
        assert pending["consumer"] == b"taker" and pending["times_delivered"] == 1
    finally:
        await pubsub.aclose()
        await redis.delete(mine, other)
