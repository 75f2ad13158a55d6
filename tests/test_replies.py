"""The gateway's side of the reply protocol, against a real redis-server.

The test plays the worker by hand (reads the enqueued job, publishes replies), which lets it
produce the faults a healthy worker never would: gaps, restarts, silence, a dying Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from api.errors import InvalidRequest, Timeout, Unavailable, UpstreamFailure
from control.redis_server import EmbeddedRedis
from serving.dispatch import Dispatcher, ReplyStream, Stopped, Timeouts
from serving.replies import Alarm, ReplyHub, Subscription, WaitExpired, own_request_prefix
from shared.messages import Failure, Final, Job, Sampling, Started, Tokens, Usage, encode
from shared.names import Names


@dataclass
class Env:
    redis: Redis
    names: Names
    dispatcher: Dispatcher
    hub: ReplyHub
    own: str | None = None
    """The ids of the jobs this process enqueues begin so, their channels under one pattern."""

    def job(self, mine: bool = True) -> Job:
        return Job(
            id=(self.own if self.own and mine else "req_") + uuid.uuid4().hex,
            tenant="default",
            model="m",
            prompt_token_ids=(1, 2),
            sampling=Sampling(max_tokens=4),
            created_at=time.time(),
        )

    async def publish(self, job: Job, *replies: Started | Tokens | Final | Failure) -> None:
        for reply in replies:
            await self.redis.publish(self.names.reply_channel(job.id), encode(reply))


async def _env(url: str, timeouts: Timeouts, own: str | None = None) -> AsyncIterator[Env]:
    redis = Redis.from_url(url)
    names = Names("replies-" + uuid.uuid4().hex[:8])
    hub = ReplyHub(redis, f"{names.prefix}:hub", own=names.reply_channel(own) if own else None)
    task = asyncio.create_task(hub.run())
    await asyncio.wait_for(hub.connected.wait(), 5)
    try:
        yield Env(redis, names, Dispatcher(redis, hub, names, timeouts), hub, own)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()


@pytest_asyncio.fixture(params=["own pattern", "channel by channel"])
async def env(redis_server: EmbeddedRedis, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    """Every test twice: jobs of this process's own (their channels under the hub's one pattern
    subscription) and jobs whose channels are subscribed to one by one (as a gateway that takes up
    another gateway's stream does)."""
    own = own_request_prefix() if request.param == "own pattern" else None
    async for e in _env(redis_server.url, Timeouts(total=10, stall=0.5), own):
        yield e


def tok(seq: int, text: str = "x") -> Tokens:
    return Tokens(seq=seq, index=0, text=text, token_ids=(seq,))


async def drain(stream: ReplyStream) -> list[object]:
    return [r async for r in stream]


async def test_reply_channel_is_subscribed_before_the_job_is_visible(env: Env) -> None:
    job = env.job()
    replies = await env.dispatcher.submit(job)
    stream_key = env.names.jobs_stream("m", "default")
    entries = await env.redis.xrange(stream_key)
    assert entries[-1][1][b"job"] == encode(job).encode()
    channel = env.names.reply_channel(job.id)
    subscribed = 0 if env.own else 1  # under the hub's pattern: no subscription of its own
    assert (await env.redis.pubsub_numsub(channel)) == [(channel.encode(), subscribed)]
    assert env.hub.listening() == 1
    final = Final(seq=2, finish_reasons=("length",), usage=Usage(prompt_tokens=2, completion_tokens=1))
    await env.publish(job, Started(seq=0, worker="w", attempt=1), tok(1, "hi"), final)
    got = await drain(replies)
    assert [type(r) for r in got] == [Started, Tokens, Final]
    await replies.close()
    assert (await env.redis.pubsub_numsub(channel)) == [(channel.encode(), 0)]
    assert env.hub.listening() == 0
    assert await env.redis.exists(env.names.cancelled(job.id)) == 0  # finished: nothing to cancel


async def test_a_job_that_is_not_enqueued_leaves_no_subscription(env: Env) -> None:
    # The gateway subscribes while admission decides; a refused job's subscription is undone.
    job = env.job()
    opening = asyncio.create_task(env.dispatcher.subscribe(job))
    await asyncio.sleep(0)
    assert env.hub.listening() == 1
    await env.dispatcher.unsubscribe(opening)
    channel = env.names.reply_channel(job.id)
    assert (await env.redis.pubsub_numsub(channel)) == [(channel.encode(), 0)]
    assert env.hub.listening() == 0
    assert await env.redis.xlen(env.names.jobs_stream("m", "default")) == 0


async def test_a_missing_message_fails_the_request(env: Env) -> None:
    job = env.job()
    replies = await env.dispatcher.submit(job)
    await env.publish(job, Started(seq=0, worker="w", attempt=1), tok(1), tok(3))
    seen = []
    with pytest.raises(UpstreamFailure) as info:
        async for reply in replies:
            seen.append(reply)
    assert info.value.code == "reply_gap"
    assert [r.seq for r in seen] == [0, 1]
    await replies.close()


async def test_a_second_start_after_tokens_is_an_error_not_duplicated_text(env: Env) -> None:
    job = env.job()
    replies = await env.dispatcher.submit(job)
    await env.publish(
        job, Started(seq=0, worker="a", attempt=1), tok(1), Started(seq=0, worker="b", attempt=2), tok(1)
    )
    with pytest.raises(UpstreamFailure) as info:
        await drain(replies)
    assert info.value.code == "worker_lost"
    await replies.close()


async def test_a_restart_before_any_token_is_followed(env: Env) -> None:
    job = env.job()
    replies = await env.dispatcher.submit(job)
    final = Final(seq=2, finish_reasons=("stop",), usage=Usage(prompt_tokens=2, completion_tokens=1))
    await env.publish(
        job, Started(seq=0, worker="a", attempt=1), Started(seq=0, worker="b", attempt=2), tok(1), final
    )
    assert [type(r) for r in await drain(replies)] == [Started, Started, Tokens, Final]
    await replies.close()


async def test_silence_after_start_is_a_stall_timeout(env: Env) -> None:
    job = env.job()
    replies = await env.dispatcher.submit(job)
    await env.publish(job, Started(seq=0, worker="w", attempt=1))
    begun = time.monotonic()
    with pytest.raises(Timeout) as info:
        await drain(replies)
    assert info.value.code == "stalled"
    assert time.monotonic() - begun < 3
    await replies.close()


async def test_worker_failure_keeps_its_status(env: Env) -> None:
    job = env.job()
    replies = await env.dispatcher.submit(job)
    await env.publish(
        job,
        Started(seq=0, worker="w", attempt=1),
        Failure(seq=1, status=400, code="invalid_request", message="nope"),
    )
    with pytest.raises(InvalidRequest, match="nope"):
        await drain(replies)
    await replies.close()


async def test_closing_an_unfinished_request_cancels_it(env: Env) -> None:
    job = env.job()
    listener = env.redis.pubsub()
    await listener.subscribe(env.names.cancel_channel())
    await listener.get_message(timeout=1)  # subscribe confirmation
    replies = await env.dispatcher.submit(job)
    await replies.close()
    assert await env.redis.exists(env.names.cancelled(job.id)) == 1
    message = await listener.get_message(timeout=2)
    assert message is not None and message["data"] == job.id.encode()
    await listener.aclose()


@pytest.mark.parametrize("own", ["req_0123abcd", None])
async def test_redis_dying_mid_request_is_an_error_not_a_hang(own: str | None) -> None:
    with EmbeddedRedis() as server:
        async for e in _env(server.url, Timeouts(total=60, stall=60), own):
            job = e.job()
            replies = await e.dispatcher.submit(job)
            await e.publish(job, Started(seq=0, worker="w", attempt=1))
            server.kill()
            begun = time.monotonic()
            with pytest.raises(Unavailable):
                await asyncio.wait_for(drain(replies), 10)
            assert time.monotonic() - begun < 5
            with pytest.raises(Unavailable):
                await e.dispatcher.submit(e.job())


async def test_a_job_followed_twice_in_one_process_reaches_both(env: Env) -> None:
    """A stream taken up again on the gateway that lost it: two subscriptions to one channel,
    each gets every reply, and the first closing leaves the second listening."""
    job = env.job()
    first = await env.dispatcher.submit(job)
    early = [Started(seq=0, worker="w", attempt=1), tok(1, "a")]
    await env.publish(job, *early)
    for reply in early:  # as a worker records them
        await env.redis.rpush(env.names.progress(job.id), encode(reply))
    second = await env.dispatcher.attach(job)
    await first.close(stop=False)
    await env.publish(
        job,
        tok(2, "b"),
        Final(seq=3, finish_reasons=("length",), usage=Usage(prompt_tokens=2, completion_tokens=2)),
    )
    replies = await asyncio.wait_for(drain(second), 5)
    assert [r.seq for r in replies] == [0, 1, 2, 3]  # type: ignore[attr-defined]


async def test_taking_up_a_stream_reads_it_back_then_follows_each_reply_once(env: Env) -> None:
    """Replies published before the attach come from the progress list, those after live, and
    one heard both ways counts once."""
    job = env.job()
    await env.dispatcher.submit(job)
    progress = env.names.progress(job.id)
    early = [Started(seq=0, worker="w", attempt=1), tok(1, "a"), tok(2, "b")]
    for reply in early:
        await env.redis.rpush(progress, encode(reply))
    follower = await env.dispatcher.attach(job)
    await env.publish(job, tok(2, "b"), tok(3, "c"))  # 2 was read back already
    await env.publish(
        job, Final(seq=4, finish_reasons=("length",), usage=Usage(prompt_tokens=2, completion_tokens=3))
    )
    replies = await asyncio.wait_for(drain(follower), 5)
    assert [r.seq for r in replies] == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]
    assert "".join(r.text for r in replies if isinstance(r, Tokens)) == "abc"


async def test_only_the_same_request_of_the_same_tenant_takes_up_a_stream(env: Env) -> None:
    from api.errors import NotFound

    job = env.job()
    await env.dispatcher.submit(job)
    for other in (
        job.model_copy(update={"tenant": "other"}),
        job.model_copy(update={"prompt_token_ids": (9,)}),
    ):
        with pytest.raises(NotFound):
            await env.dispatcher.attach(other)


async def test_a_job_stopped_before_its_end_is_not_waited_for(env: Env) -> None:
    """Its client left, so it was cancelled and no reply will come: taking it up fails at once
    (not after the stall timeout); one whose end got out as the cancel went is answered."""
    job = env.job()
    first = await env.dispatcher.submit(job)
    progress = env.names.progress(job.id)
    for reply in (Started(seq=0, worker="w", attempt=1), tok(1, "a")):
        await env.redis.rpush(progress, encode(reply))
    await first.close()  # unfinished: cancelled
    with pytest.raises(Stopped):
        await asyncio.wait_for(env.dispatcher.attach(job), 2)
    end = Final(seq=2, finish_reasons=("length",), usage=Usage(prompt_tokens=2, completion_tokens=1))
    await env.redis.rpush(progress, encode(end))
    replies = await asyncio.wait_for(drain(await env.dispatcher.attach(job)), 5)
    assert [r.seq for r in replies] == [0, 1, 2]  # type: ignore[attr-defined]


async def test_replies_that_keep_coming_never_meet_the_stall_timeout(env: Env) -> None:
    # Each wait is shorter than the stall timeout (0.5 s), all of them together far longer: the one
    # timer behind the waits must measure each wait, not the time since it was set.
    job = env.job()
    stream = await env.dispatcher.submit(job)
    replies = stream.__aiter__()
    await env.publish(job, Started(seq=0, worker="w1", attempt=1))
    assert isinstance(await anext(replies), Started)
    for seq in range(1, 8):
        await asyncio.sleep(0.2)
        await env.publish(job, tok(seq))
        assert (await anext(replies)).seq == seq
    await asyncio.sleep(0.2)
    await env.publish(
        job, Final(seq=8, finish_reasons=("length",), usage=Usage(prompt_tokens=2, completion_tokens=7))
    )
    assert isinstance(await anext(replies), Final)
    await stream.close()


async def test_a_job_no_worker_starts_meets_the_queue_timeout(redis_server: EmbeddedRedis) -> None:
    async for env in _env(redis_server.url, Timeouts(total=10, stall=5, queue=0.3)):
        stream = await env.dispatcher.submit(env.job())
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await drain(stream)
        assert info.value.code == "queue_timeout"
        assert 0.25 < time.monotonic() - started < 2
        await stream.close()


async def test_the_alarm_fails_only_a_wait_that_lasts_its_budget() -> None:
    sub = Subscription("c")
    alarm = Alarm(sub)
    for _ in range(5):  # waits of 0.05 s against a budget of 0.15 s, for 0.25 s in all
        alarm.waiting(time.monotonic() + 0.15, "stall")
        asyncio.get_running_loop().call_later(0.05, sub.queue.put_nowait, b"reply")
        assert await sub.get() == b"reply"
        alarm.done()
    alarm.waiting(time.monotonic() + 0.05, "queue")  # sooner than the timer is set for: moved
    started = time.monotonic()
    with pytest.raises(WaitExpired) as info:
        await sub.get()
    assert info.value.why == "queue" and time.monotonic() - started < 0.12
    alarm.cancel()


async def test_one_pattern_for_the_own_jobs_a_subscription_for_anyone_elses(
    redis_server: EmbeddedRedis,
) -> None:
    """A gateway subscribes to no channel of a job it enqueued (its pattern covers them), and to
    the channel of a job another gateway enqueued (a stream taken up) until it stops following it."""
    async with Redis.from_url(redis_server.url) as redis:
        patterns = await redis.pubsub_numpat()  # the session's gateways' (a count for the server)
    async for env in _env(redis_server.url, Timeouts(total=10, stall=5), own_request_prefix()):
        assert await env.redis.pubsub_numpat() == patterns + 1
        mine, theirs = env.job(), env.job(mine=False)
        streams = [await env.dispatcher.submit(mine), await env.dispatcher.submit(theirs)]
        counts = await env.redis.pubsub_numsub(*(env.names.reply_channel(j.id) for j in (mine, theirs)))
        assert [n for _, n in counts] == [0, 1]
        for job in (mine, theirs):
            final = Final(seq=1, finish_reasons=("stop",), usage=Usage(prompt_tokens=2, completion_tokens=0))
            await env.publish(job, Started(seq=0, worker="w", attempt=1), final)
        for stream in streams:
            assert [type(r) for r in await asyncio.wait_for(drain(stream), 5)] == [Started, Final]
            await stream.close()
        counts = await env.redis.pubsub_numsub(env.names.reply_channel(theirs.id))
        assert [n for _, n in counts] == [0]
        assert env.hub.listening() == 0


async def test_replies_that_arrive_together_reach_each_follower_whole_and_in_order(env: Env) -> None:
    """Thousands of messages come in few socket reads, a subscription's confirmation among them:
    every message reaches its channel's follower once, in order, and the new channel is confirmed."""
    busy, other = env.job(), env.job(mine=False)
    first = await env.hub.open(env.names.reply_channel(busy.id))
    payloads = [f"m{i}".encode() for i in range(3000)]
    async with env.redis.pipeline(transaction=False) as pipe:
        for data in payloads[:1500]:
            pipe.publish(env.names.reply_channel(busy.id), data)
        await pipe.execute()
    second = await asyncio.wait_for(env.hub.open(env.names.reply_channel(other.id)), 5)
    async with env.redis.pipeline(transaction=False) as pipe:
        for data in payloads[1500:]:
            pipe.publish(env.names.reply_channel(busy.id), data)
        pipe.publish(env.names.reply_channel(other.id), b"theirs")
        await pipe.execute()
    got = [await asyncio.wait_for(first.get(), 5) for _ in payloads]
    assert got == payloads and first.queue.empty()
    assert await asyncio.wait_for(second.get(), 5) == b"theirs"
    await env.hub.close(first)
    await env.hub.close(second)
    assert env.hub.listening() == 0
