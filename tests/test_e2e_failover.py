"""A worker SIGKILLed mid-stream: another worker resumes every stream exactly where it stopped."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Iterator

import pytest
from openai import AsyncOpenAI
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.names import GROUP
from tests.conftest import System, worker_env
from tests.procs import spawn, stop, wait_until

pytestmark = pytest.mark.e2e

STREAMS = 24
TOKENS = 800


MODEL = "failover-demo"


@pytest.fixture
def two_workers(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Two workers of their own model (worker id -> pid): the session's worker does not compete."""
    logs = tmp_path_factory.mktemp("failover")
    procs = {}
    for name in ("fo-a", "fo-b"):
        env = worker_env(
            system.env(), system.model_dir, SWITCHYARD_WORKER_ID=name, SWITCHYARD_SERVED_MODEL_NAME=MODEL
        )
        procs[name] = spawn("worker", env, logs / f"{name}.log")
    try:
        for name, proc in procs.items():
            log = logs / f"{name}.log"
            wait_until(lambda log=log: b"serving" in log.read_bytes(), 300, name, procs=(proc,), logs=(log,))
        yield {name: proc.pid for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            stop(proc, grace=1)
        asyncio.run(_forget(system))


async def _forget(system: System) -> None:
    """Later tests (and alert rules) must not see a model whose workers are gone."""
    redis = Redis.from_url(system.redis_url)
    try:
        await redis.hdel(system.names.models(), MODEL)
        for name in ("fo-a", "fo-b"):
            await redis.zrem(system.names.workers(), name)
            await redis.delete(system.names.worker(name))
    finally:
        await redis.aclose()


async def pending(redis: Redis, system: System) -> dict[str, int]:
    stream = system.names.jobs_stream(MODEL, "main")
    try:
        consumers = await redis.xinfo_consumers(stream, GROUP)
    except ResponseError:  # no stream or group yet: nobody holds anything
        return {}
    return {c["name"].decode(): int(c["pending"]) for c in consumers}


async def test_streams_survive_a_killed_worker(
    system: System, aclient: AsyncOpenAI, redis: Redis, two_workers: dict[str, int]
) -> None:
    begun = time.monotonic()
    while MODEL not in [m.id for m in (await aclient.models.list()).data]:  # the gateway sees both workers
        assert time.monotonic() - begun < 30, "the gateway never listed the model"
        await asyncio.sleep(0.2)
    # The tenant's stream exists before the burst.
    await aclient.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    await asyncio.sleep(1.0)
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
    usage: list[int] = [0] * STREAMS
    finish: list[str | None] = [None] * STREAMS

    async def one(i: int) -> None:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"story {i}"}],
            max_tokens=TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            arrivals[i].append(time.monotonic())
            if chunk.choices and chunk.choices[0].finish_reason:
                finish[i] = chunk.choices[0].finish_reason
            if chunk.usage:
                usage[i] = chunk.usage.completion_tokens

    tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]  # a burst: all run at once
    deadline = time.monotonic() + 60
    # Kill once the workers hold most of the jobs (the CPU engine may hand out tokens in bursts,
    # so the client's chunks are no reliable sign that generation is under way).
    while sum((holding := await pending(redis, system)).values()) < STREAMS * 2 // 3:
        assert time.monotonic() < deadline, "the workers never took the jobs"
        await asyncio.sleep(0.02)
    assert holding, "no worker holds a job"
    victim = max(holding, key=holding.__getitem__)
    held = holding[victim]
    os.killpg(two_workers[victim], signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*tasks), 120)

    assert usage == [TOKENS] * STREAMS  # every token exactly once: the gateway refuses gaps and repeats
    assert finish == ["length"] * STREAMS
    gaps = [max((b - a for a, b in itertools.pairwise(t) if b > killed_at), default=0.0) for t in arrivals]
    recovery = max(gaps)
    print(f"killed a worker holding {held} of {STREAMS} streams; longest pause {recovery:.1f}s")
    assert held > 0
    assert recovery < 15
