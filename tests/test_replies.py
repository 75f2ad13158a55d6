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
from serving.dispatch import Dispatcher, ReplyStream, Timeouts
from serving.replies import ReplyHub
from shared.messages import Failure, Final, Job, Sampling, Started, Tokens, Usage, encode
from shared.names import Names


@dataclass
class Env:
    redis: Redis
    names: Names
    dispatcher: Dispatcher

    def job(self) -> Job:
        return Job(
            id="req_" + uuid.uuid4().hex,
            tenant="default",
            model="m",
            prompt_token_ids=(1, 2),
            sampling=Sampling(max_tokens=4),
            created_at=time.time(),
        )

    async def publish(self, job: Job, *replies: Started | Tokens | Final | Failure) -> None:
        for reply in replies:
            await self.redis.publish(self.names.reply_channel(job.id), encode(reply))


async def _env(url: str, timeouts: Timeouts) -> AsyncIterator[Env]:
    redis = Redis.from_url(url)
    names = Names("replies-" + uuid.uuid4().hex[:8])
    hub = ReplyHub(redis, control_channel=f"{names.prefix}:hub")
    task = asyncio.create_task(hub.run())
    await asyncio.wait_for(hub.connected.wait(), 5)
    try:
        yield Env(redis, names, Dispatcher(redis, hub, names, timeouts))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()


@pytest_asyncio.fixture
async def env(redis_server: EmbeddedRedis) -> AsyncIterator[Env]:
    async for e in _env(redis_server.url, Timeouts(total=10, stall=0.5)):
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
    assert (await env.redis.pubsub_numsub(channel)) == [(channel.encode(), 1)]
    final = Final(seq=2, finish_reasons=("length",), usage=Usage(prompt_tokens=2, completion_tokens=1))
    await env.publish(job, Started(seq=0, worker="w", attempt=1), tok(1, "hi"), final)
    got = await drain(replies)
    assert [type(r) for r in got] == [Started, Tokens, Final]
    await replies.close()
    assert (await env.redis.pubsub_numsub(channel)) == [(channel.encode(), 0)]
    assert await env.redis.exists(env.names.cancelled(job.id)) == 0  # finished: nothing to cancel


async def test_a_job_that_is_not_enqueued_leaves_no_subscription(env: Env) -> None:
    # The gateway subscribes while admission decides; a refused job's subscription is undone.
    job = env.job()
    opening = asyncio.create_task(env.dispatcher.subscribe(job))
    await env.dispatcher.unsubscribe(opening)
    channel = env.names.reply_channel(job.id)
    assert (await env.redis.pubsub_numsub(channel)) == [(channel.encode(), 0)]
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


async def test_redis_dying_mid_request_is_an_error_not_a_hang() -> None:
    with EmbeddedRedis() as server:
        async for e in _env(server.url, Timeouts(total=60, stall=60)):
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
