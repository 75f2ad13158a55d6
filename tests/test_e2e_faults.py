"""Disconnects, queued waits, reclaimed and poisoned jobs — on the real worker and gateway."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest
from redis.asyncio import Redis

from shared.messages import (
    Failure,
    Final,
    Job,
    Sampling,
    Started,
    StreamRecord,
    Tokens,
    WorkerInfo,
    decode_reply,
    encode,
)
from shared.names import GROUP, JOB_FIELD
from tests.conftest import SESSION_RECLAIM_IDLE, System
from tests.procs import wait_for

pytestmark = pytest.mark.e2e

LONG = {"max_tokens": 1000, "n": 4, "ignore_eos": True}  # seconds of work, even on a quiet machine


async def worker_info(redis: Redis, system: System) -> WorkerInfo:
    ids = await redis.zrange(system.names.workers(), 0, -1)
    infos = [await redis.get(system.names.worker(i.decode())) for i in ids]
    live = [w for w in (WorkerInfo.model_validate_json(i) for i in infos if i) if w.model == system.model]
    assert len(live) == 1
    return live[0]


async def engine_busy(redis: Redis, system: System) -> bool:
    return (await worker_info(redis, system)).running > 0


async def engine_idle(redis: Redis, system: System) -> bool:
    info = await worker_info(redis, system)
    return info.running == 0 and info.inflight == 0


def chat_body(system: System, **extra: object) -> dict[str, object]:
    return {"model": system.model, "messages": [{"role": "user", "content": "go on"}], **extra}


async def test_streaming_disconnect_aborts_the_engine_request(system: System, redis: Redis) -> None:
    body = chat_body(system, stream=True, **LONG)
    async with (
        httpx.AsyncClient(base_url=system.base_url, timeout=30, headers=system.headers) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.aiter_lines()
        while not (await anext(lines)).startswith("data: {"):
            pass
        await wait_for(lambda: engine_busy(redis, system), 5)
    # The connection is closed here, hundreds of tokens before the end.
    took = await wait_for(lambda: engine_idle(redis, system), 5)
    print(f"streaming disconnect → engine idle in {took:.2f}s")
    assert took < 2.5


async def test_non_streaming_disconnect_aborts_the_engine_request(system: System, redis: Redis) -> None:
    async with httpx.AsyncClient(base_url=system.base_url, headers=system.headers) as http:
        try:
            response = await http.post("/v1/chat/completions", json=chat_body(system, **LONG), timeout=0.8)
        except httpx.ReadTimeout:
            pass  # the client gave up, as intended
        else:
            pytest.fail(f"answered before the client left: {response.status_code} {response.text[:300]}")
    took = await wait_for(lambda: engine_idle(redis, system), 5)
    print(f"non-streaming disconnect → engine idle in {took:.2f}s")
    assert took < 2.5


async def forget_model(redis: Redis, system: System, name: str) -> None:
    """Undo :func:`fake_model`, so later tests (and alert rules) do not see a model without workers."""
    await redis.zrem(system.names.workers(), f"idle-{name}")
    await redis.delete(system.names.worker(f"idle-{name}"))
    await redis.hdel(system.names.models(), name)


async def fake_model(redis: Redis, system: System, name: str, live: bool) -> None:
    """Advertise a model the way a worker does, but with no worker consuming its queue."""
    now = time.time()
    info = WorkerInfo(
        id=f"idle-{name}",
        model=name,
        tokenizer=str(system.model_dir),
        max_model_len=512,
        capacity=1,
        started_at=now,
        heartbeat_at=now,
    )
    await redis.hset(system.names.models(), name, encode(info))
    if live:
        await redis.set(system.names.worker(info.id), encode(info), ex=30)
        await redis.zadd(system.names.workers(), {info.id: now})


async def test_queued_stream_gets_keepalives_and_its_cancel_is_recorded(system: System, redis: Redis) -> None:
    model = "queued-" + uuid.uuid4().hex[:6]
    await fake_model(redis, system, model, live=True)
    await asyncio.sleep(0.6)  # past the gateway's registry cache
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    pings = 0
    async with (
        httpx.AsyncClient(base_url=system.base_url, timeout=10, headers=system.headers) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        request_id = r.headers["x-request-id"]
        assert r.status_code == 200
        begun = time.monotonic()
        async for line in r.aiter_lines():
            pings += line.startswith(":")
            if time.monotonic() - begun > 1.3:
                break
    assert pings >= 2
    stream = system.names.jobs_stream(model, "main")
    assert await redis.xlen(stream) == 1  # still queued: nobody serves this model
    await wait_for(lambda: redis.exists(system.names.cancelled(request_id)), 3)
    await forget_model(redis, system, model)


async def test_known_model_without_live_worker_is_503(system: System, redis: Redis) -> None:
    model = "retired-" + uuid.uuid4().hex[:6]
    await fake_model(redis, system, model, live=False)
    async with httpx.AsyncClient(base_url=system.base_url, headers=system.headers) as http:
        r = await http.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )
    await forget_model(redis, system, model)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "service_unavailable"
    assert int(r.headers["retry-after"]) >= 1


def demo_job(system: System, max_tokens: int = 8) -> Job:
    return Job(
        id="req_" + uuid.uuid4().hex,
        tenant="main",
        model=system.model,
        prompt_token_ids=(1, 2, 3, 4),
        sampling=Sampling(max_tokens=max_tokens, ignore_eos=True),
        created_at=time.time(),
    )


async def replies_of(redis: Redis, system: System, job: Job, until: type, within: float) -> list[object]:
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(system.names.reply_channel(job.id))
    got: list[object] = []
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            msg = await pubsub.get_message(timeout=0.2)
            if msg:
                got.append(decode_reply(msg["data"]))
                if isinstance(got[-1], until | Failure):
                    return got
        raise AssertionError(f"no {until.__name__} within {within}s; got {got}")
    finally:
        await pubsub.aclose()


async def registered_stream(redis: Redis, system: System) -> str:
    """The session tenant's job stream, listed in the model's index as a gateway does it."""
    stream = system.names.jobs_stream(system.model, "main")
    await redis.hset(system.names.streams_index(system.model), stream, encode(StreamRecord(tenant="main")))
    return stream


async def enqueue_as_ghost(redis: Redis, system: System, job: Job, deliveries: int) -> str:
    """Enqueue a job and leave it pending under consumers that never finish it."""
    stream = await registered_stream(redis, system)
    # One transaction, so the live worker cannot read the entry before the ghost does.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(stream, {JOB_FIELD: encode(job)})
        pipe.xreadgroup(GROUP, "ghost-0", {stream: ">"}, count=1)
        entry_id, read = await pipe.execute()
    assert read[0][1][0][0] == entry_id
    for i in range(1, deliveries):  # each XCLAIM counts as one more delivery
        await redis.xclaim(stream, GROUP, f"ghost-{i}", 0, [entry_id])
    return entry_id.decode()


async def test_a_job_left_by_a_dead_worker_is_reclaimed_and_completed(system: System, redis: Redis) -> None:
    job = demo_job(system)
    listening = asyncio.create_task(replies_of(redis, system, job, Final, within=20))
    await asyncio.sleep(0.2)
    begun = time.monotonic()
    await enqueue_as_ghost(redis, system, job, deliveries=1)
    got = await listening
    took = time.monotonic() - begun
    started = [r for r in got if isinstance(r, Started)]
    assert started and started[-1].attempt >= 2
    assert sum(len(r.token_ids) for r in got if isinstance(r, Tokens)) == 8
    assert isinstance(got[-1], Final)
    print(f"reclaimed after {took:.1f}s (reclaim idle {SESSION_RECLAIM_IDLE}s)")
    stream = system.names.jobs_stream(system.model, "main")
    assert (await redis.xpending(stream, GROUP))["pending"] == 0


async def test_a_job_that_keeps_failing_goes_to_the_dead_letter_stream(system: System, redis: Redis) -> None:
    job = demo_job(system)
    dead = system.names.dead_letter(system.model)
    before = await redis.xlen(dead)
    listening = asyncio.create_task(replies_of(redis, system, job, Final, within=20))
    await asyncio.sleep(0.2)
    await enqueue_as_ghost(redis, system, job, deliveries=3)
    got = await listening
    assert isinstance(got[-1], Failure) and got[-1].code == "job_failed"
    assert await redis.xlen(dead) == before + 1
    last = (await redis.xrevrange(dead, count=1))[0][1]
    assert json.loads(last[JOB_FIELD.encode()])["id"] == job.id


async def test_a_job_of_a_newer_wire_version_is_refused_to_its_client_at_once(
    system: System, redis: Redis
) -> None:
    """A gateway of a newer release enqueues a job this worker cannot read: the entry goes to the
    dead-letter stream and the client hears why, rather than waiting for its queue timeout."""
    job = demo_job(system)
    future = {**json.loads(encode(job)), "v": 99}
    dead = system.names.dead_letter(system.model)
    before = await redis.xlen(dead)
    listening = asyncio.create_task(replies_of(redis, system, job, Final, within=10))
    await asyncio.sleep(0.2)
    stream = await registered_stream(redis, system)
    await redis.xadd(stream, {JOB_FIELD: json.dumps(future)})
    got = await listening
    assert len(got) == 1 and isinstance(got[0], Failure) and got[0].code == "unreadable_job", got
    assert "99" in got[0].message
    assert await redis.xlen(dead) == before + 1


async def test_a_worker_skips_a_job_whose_client_already_left(system: System, redis: Redis) -> None:
    job = demo_job(system, max_tokens=50)
    await redis.set(system.names.cancelled(job.id), b"1", ex=60)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(system.names.reply_channel(job.id))
    stream = await registered_stream(redis, system)
    await redis.xadd(stream, {JOB_FIELD: encode(job)})
    got = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(timeout=0.2)
        if msg:
            got.append(decode_reply(msg["data"]))
    await pubsub.aclose()
    # It generates nothing; anyone still following the job (a retry under the same key) hears
    # at once that it stopped.
    assert [type(r) for r in got] == [Started, Failure], got
    assert isinstance(got[1], Failure) and got[1].code == "request_stopped"
    assert (await redis.xpending(stream, GROUP))["pending"] == 0
