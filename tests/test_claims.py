"""A worker's writes for a job are fenced by its claim, against a real redis-server.

A worker that stalls past the reclaim idle time loses its jobs to another worker. When it wakes up
it must not publish a single reply next to the new owner's, nor end or re-queue the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared.messages import Final, Job, Sampling, Started, Tokens, Usage, decode_reply, encode
from shared.names import GROUP, JOB_FIELD, Names
from shared.scripts import claimed_publish, merge_publishes
from worker.channel import ENDED_TTL_MS, Claim, ClaimLost, NobodyListening, Progress, ReplyChannel
from worker.metrics import WorkerMetrics
from worker.outbox import MERGED_PUBLISHES, Command, Outbox, _merged
from worker.runner import JobRunner


@dataclass
class Held:
    """One job entry, read by worker ``a`` and then claimed by worker ``b``."""

    names: Names
    claim_a: Claim
    claim_b: Claim
    outbox: Outbox

    def runner(self, worker: str) -> JobRunner:
        """A runner for hand-backs, which never touch the engine."""
        return JobRunner(
            self.outbox,
            self.names,
            engine=None,  # type: ignore[arg-type]
            worker_id=worker,
            flush_interval=lambda: 0.04,
            stop_reason=lambda _: None,
            metrics=WorkerMetrics("m"),
        )

    def channel(self, claim: Claim, worker: str, fresh: bool = True) -> ReplyChannel:
        return ReplyChannel(self.outbox, self.names, claim, worker, published=lambda _: None, fresh=fresh)


@pytest_asyncio.fixture
async def held(redis: Redis) -> AsyncIterator[Held]:
    names = Names(prefix=f"syclaims{uuid.uuid4().hex[:8]}")
    stream = names.jobs_stream("m", "t")
    job = Job(
        id="req_" + uuid.uuid4().hex,
        tenant="t",
        model="m",
        prompt_token_ids=(1, 2),
        sampling=Sampling(max_tokens=4),
        created_at=time.time(),
    )
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await redis.xadd(stream, {JOB_FIELD: encode(job)})
    ((_, [(entry, _)]),) = await redis.xreadgroup(GROUP, "a", {stream: ">"}, count=1)
    entry_id = entry.decode()
    outbox = Outbox(redis)
    runner = asyncio.create_task(outbox.run())
    claim_a = Claim(stream=stream, entry_id=entry_id, job=job, attempt=1)
    claim_b = Claim(stream=stream, entry_id=entry_id, job=job, attempt=2)
    gateway = redis.pubsub()  # someone listens, as the gateway that enqueued the job does
    await gateway.subscribe(names.reply_channel(job.id))
    try:
        yield Held(names, claim_a, claim_b, outbox)
    finally:
        await gateway.aclose()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await redis.delete(stream, names.progress(job.id), names.drained("m"))


async def take_over(redis: Redis, held: Held) -> None:
    """What XAUTOCLAIM does to a claim that went idle: worker b owns the entry now."""
    await redis.xclaim(held.claim_a.stream, GROUP, "b", 0, [held.claim_a.entry_id])


def tokens(seq: int, ids: tuple[int, ...]) -> Tokens:
    return Tokens(seq=seq, index=0, text="x" * len(ids), token_ids=ids)


async def published(redis: Redis, channel: str, action: asyncio.Future[None]) -> list[int]:
    """Sequence numbers published on ``channel`` while ``action`` runs (and shortly after)."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    seqs: list[int] = []
    try:
        await action
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            message = await pubsub.get_message(timeout=0.05)
            if message is not None:
                seqs.append(decode_reply(message["data"]).seq)
    finally:
        await pubsub.aclose()
    return seqs


async def test_the_owner_publishes_and_records_progress(redis: Redis, held: Held) -> None:
    a = held.channel(held.claim_a, "a")
    channel = held.names.reply_channel(held.claim_a.job.id)

    async def send() -> None:
        await a.send([Started(seq=0, worker="a", attempt=1), tokens(1, (5, 6))])

    assert await published(redis, channel, asyncio.ensure_future(send())) == [0, 1]
    key = held.names.progress(held.claim_a.job.id)
    assert [decode_reply(m).seq for m in await redis.lrange(key, 0, -1)] == [0, 1]  # every reply
    assert Progress.parse(await redis.lrange(key, 0, -1)) == Progress(last_seq=1, token_ids=(5, 6))
    await a.send(
        [Final(seq=2, finish_reasons=("stop",), usage=Usage(prompt_tokens=1, completion_tokens=2))], ack=True
    )
    assert len(await redis.lrange(key, 0, -1)) == 3, "kept after the end, for a client that comes back"
    assert 0 < await redis.pttl(key) <= ENDED_TTL_MS


async def test_an_attempt_that_starts_over_clears_what_the_last_one_left(redis: Redis, held: Held) -> None:
    """A job that cannot resume (several choices, a grammar) starts over: its list must not mix
    the runs, or a client taking up its stream would get the first run's text."""
    await held.channel(held.claim_a, "a").send([Started(seq=0, worker="a", attempt=1), tokens(1, (5,))])
    await take_over(redis, held)
    b = held.channel(held.claim_b, "b", fresh=True)
    await b.send([Started(seq=0, worker="b", attempt=2)])
    await b.send([tokens(1, (9,))])
    entries = [decode_reply(m) for m in await redis.lrange(held.names.progress(held.claim_a.job.id), 0, -1)]
    assert [(type(m).__name__, m.seq) for m in entries] == [("Started", 0), ("Tokens", 1)]
    assert entries[0].worker == "b"  # type: ignore[union-attr]


async def test_a_worker_that_lost_its_claim_publishes_nothing(redis: Redis, held: Held) -> None:
    a = held.channel(held.claim_a, "a")
    await a.send([tokens(0, (5, 6))])
    await take_over(redis, held)
    channel = held.names.reply_channel(held.claim_a.job.id)

    async def late_tokens() -> None:
        with pytest.raises(ClaimLost):
            await a.send([tokens(1, (7,))])

    assert await published(redis, channel, asyncio.ensure_future(late_tokens())) == []
    progress = await redis.lrange(held.names.progress(held.claim_a.job.id), 0, -1)
    assert len(progress) == 1, "the late batch must not enter the progress b resumes from"

    b = held.channel(held.claim_b, "b", fresh=False)
    await b.send([tokens(1, (7,))])  # the new owner goes on
    assert len(await redis.lrange(held.names.progress(held.claim_a.job.id), 0, -1)) == 2


async def test_a_worker_that_lost_its_claim_cannot_end_the_job(redis: Redis, held: Held) -> None:
    a = held.channel(held.claim_a, "a")
    await take_over(redis, held)
    with pytest.raises(ClaimLost):
        await a.send([], ack=True)
    pending = await redis.xpending_range(held.claim_a.stream, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pending] == [
        (held.claim_a.entry_id, "b")
    ]
    assert await redis.xlen(held.claim_a.stream) == 1

    await held.channel(held.claim_b, "b").send([], ack=True)  # the owner can
    assert await redis.xlen(held.claim_a.stream) == 0
    assert int(await redis.get(held.names.drained("m")) or 0) == 1


async def test_a_worker_that_lost_its_claim_cannot_requeue_the_job(redis: Redis, held: Held) -> None:
    runner_a = held.runner("a")
    await take_over(redis, held)
    with pytest.raises(ClaimLost):
        await runner_a.hand_back(held.claim_a)
    assert await redis.xlen(held.claim_a.stream) == 1, "a second copy of the job would run twice"

    runner_b = held.runner("b")
    await runner_b.hand_back(held.claim_b)
    entries = await redis.xrange(held.claim_a.stream)
    assert len(entries) == 1 and entries[0][0].decode() != held.claim_a.entry_id


async def test_a_stopped_outbox_refuses_at_once_instead_of_leaving_the_sender_waiting(redis: Redis) -> None:
    outbox = Outbox(redis)
    runner = asyncio.create_task(outbox.run())
    assert await outbox.send(("PING",)) == [True]
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    with pytest.raises(RedisError):
        await asyncio.wait_for(outbox.send(("PING",)), 2)


async def test_calls_that_meet_a_redis_without_the_scripts_load_them_and_run_once(
    redis: Redis, held: Held
) -> None:
    a = held.channel(held.claim_a, "a")
    await a.send([tokens(0, (5, 6))])
    await redis.script_flush()  # what a restarted Redis knows of them
    channel = held.names.reply_channel(held.claim_a.job.id)

    async def send() -> None:
        await a.send([tokens(1, (7,)), tokens(2, (8,))])

    assert await published(redis, channel, asyncio.ensure_future(send())) == [1, 2]
    assert len(await redis.lrange(held.names.progress(held.claim_a.job.id), 0, -1)) == 3


async def test_a_publish_nobody_hears_says_so_but_still_ends_the_job(redis: Redis, held: Held) -> None:
    lonely = replace(held.claim_a, job=held.claim_a.job.model_copy(update={"id": "req_nobody"}))
    with pytest.raises(NobodyListening):  # its gateway is gone: the worker should stop the job
        await held.channel(lonely, "a").send([tokens(0, (5,))])
    await held.channel(lonely, "a").send([], ack=True)  # ending it is heard or not: no matter
    assert await redis.xlen(held.claim_a.stream) == 0


async def test_a_batch_gets_each_reply_in_order_and_a_refused_command_its_error(redis: Redis) -> None:
    """Replies are parsed as the bytes come: a batch far larger than one socket read, with an error
    in the middle, gives every command its own reply."""
    outbox = Outbox(redis, max_batch=10_000)
    runner = asyncio.create_task(outbox.run())
    key = f"outbox:{uuid.uuid4().hex}"
    try:
        value = "v" * 1000
        sets = [("SET", f"{key}:{i}", value) for i in range(300)]
        gets = [("GET", f"{key}:{i}") for i in range(300)]
        assert await outbox.send(*sets) == [True] * 300  # SET's reply through redis-py's callback
        assert await outbox.send(*gets) == [value.encode()] * 300  # ~300 KB of replies
        await redis.set(key, "text")
        with pytest.raises(ResponseError, match="not an integer"):
            await outbox.send(("INCR", f"{key}:n"), ("INCR", key), ("INCR", f"{key}:n"))
        assert await redis.get(f"{key}:n") == b"2"  # both sides of the error ran
        assert await outbox.send(("INCR", f"{key}:n")) == [3]  # and nothing was left unread
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_a_read_cut_short_leaves_no_reply_for_the_next_commands(redis: Redis) -> None:
    """A sender cancelled while its batch's replies are read: the connection is dropped, so the
    replies still on their way cannot be taken for the answers of the next batch."""
    outbox = Outbox(redis)
    runner = asyncio.create_task(outbox.run())
    try:
        slow = asyncio.ensure_future(outbox.send(("DEBUG", "SLEEP", "0.3"), ("PING",)))
        await asyncio.sleep(0.1)
        runner.cancel()  # mid-read: the outbox stops, as a worker shutting down stops it
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        with pytest.raises(RedisError):
            await slow
        assert await redis.echo("next") == b"next"  # the pool's connections answer their own
        await asyncio.sleep(0.3)
        assert await redis.echo("after") == b"after"
    finally:
        runner.cancel()


async def test_jobs_that_publish_together_are_each_fenced_and_answered_on_their_own(
    redis: Redis, held: Held
) -> None:
    """The outbox sends the publishes queued together as one script call: each job's ownership is
    still checked on its own, and each sender gets its own job's result."""
    other = held.claim_a.job.model_copy(update={"id": "req_" + uuid.uuid4().hex})
    await redis.xadd(held.claim_a.stream, {JOB_FIELD: encode(other)})
    ((_, [(entry, _)]),) = await redis.xreadgroup(GROUP, "a", {held.claim_a.stream: ">"}, count=1)
    lonely = Claim(stream=held.claim_a.stream, entry_id=entry.decode(), job=other, attempt=1)
    owned = held.channel(held.claim_a, "a")
    unheard = held.channel(lonely, "a")  # its gateway is gone: nobody listens on its channel
    stranger = held.channel(held.claim_b, "b")  # "b" does not own the entry: fenced off
    results = await asyncio.gather(
        owned.send([tokens(0, (5,))]),
        unheard.send([tokens(0, (6,))]),
        stranger.send([tokens(0, (7,))]),
        owned.send([tokens(1, (8,))], ack=True),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [type(None), NobodyListening, ClaimLost, type(None)]
    progress = await redis.lrange(held.names.progress(held.claim_a.job.id), 0, -1)
    # "b"'s message never got in
    assert [decode_reply(m).token_ids for m in progress] == [(5,), (8,)]  # type: ignore[union-attr]
    assert await redis.xpending(held.claim_a.stream, GROUP) == {
        "pending": 1,  # the owned job ended; the other still runs
        "min": entry,
        "max": entry,
        "consumers": [{"name": b"a", "pending": 1}],
    }


def test_consecutive_publishes_go_as_one_call_and_everything_else_as_it_was() -> None:
    names = Names("p")

    def publish(job: str, worker: str = "w", payload: bytes = b"{}") -> Command:
        keys = (names.jobs_stream("m", "t"), names.progress(job), names.drained("m"))
        return claimed_publish(
            keys, (GROUP, worker, 1000, 100), "1-0", names.reply_channel(job), "", [payload, "1"]
        )

    exists = ("EXISTS", "x")
    commands = [publish("j1"), publish("j2"), exists, publish("j3"), publish("j4", worker="v"), publish("j5")]
    sent, counts = _merged(commands)
    assert counts == [2, 0, 0, 0, 0]
    assert sent[0] == merge_publishes(commands[:2]) and sent[1:] == [exists, *commands[3:]]
    assert sent[0][2] == 6  # both jobs' three keys
    many = [publish(f"j{i}") for i in range(MERGED_PUBLISHES + 1)]
    assert _merged(many)[1] == [MERGED_PUBLISHES, 0]  # a script holds Redis while it runs: capped


async def test_a_job_whose_publish_fails_does_not_fail_the_jobs_sent_with_it(
    redis: Redis, held: Held
) -> None:
    """One job's command failing inside the merged call (here its progress key holds a string)
    is that job's error alone: the jobs before and after it publish and end as if called alone."""
    claims = [held.claim_a]
    for _ in range(2):
        job = held.claim_a.job.model_copy(update={"id": "req_" + uuid.uuid4().hex})
        await redis.xadd(held.claim_a.stream, {JOB_FIELD: encode(job)})
        ((_, [(entry, _)]),) = await redis.xreadgroup(GROUP, "a", {held.claim_a.stream: ">"}, count=1)
        claims.append(Claim(stream=held.claim_a.stream, entry_id=entry.decode(), job=job, attempt=1))
    broken = held.names.progress(claims[1].job.id)
    await redis.set(broken, "not a list")
    gateway = redis.pubsub()
    await gateway.subscribe(*(held.names.reply_channel(c.job.id) for c in claims[1:]))
    try:
        results = await asyncio.gather(
            # not fresh: a fresh attempt would clear the broken key first
            *(
                held.channel(c, "a", fresh=False).send([tokens(0, (i,))], ack=True)
                for i, c in enumerate(claims)
            ),
            return_exceptions=True,
        )
    finally:
        await gateway.aclose()
        await redis.delete(broken, *(held.names.progress(c.job.id) for c in claims[2:]))
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
    pending = await redis.xpending_range(held.claim_a.stream, GROUP, min="-", max="+", count=10)
    assert [p["message_id"].decode() for p in pending] == [claims[1].entry_id]  # the others ended


async def test_a_command_that_cannot_be_sent_fails_its_sender_and_not_the_outbox(redis: Redis) -> None:
    outbox = Outbox(redis)
    runner = asyncio.create_task(outbox.run())
    try:
        with pytest.raises(TypeError):  # hiredis packs no None
            await asyncio.wait_for(outbox.send(("SET", "k", None)), 5)
        assert await asyncio.wait_for(outbox.send(("PING",)), 5) == [True]
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
