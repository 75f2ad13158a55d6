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
TOKENS = 400


@pytest.fixture
def doomed_worker(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A second worker on the session's Redis and model, to be killed by the test."""
    log = tmp_path_factory.mktemp("doomed") / "worker.log"
    proc = spawn("worker", worker_env(system.env(), system.model_dir, SWITCHYARD_WORKER_ID="doomed"), log)
    try:
        wait_until(lambda: b"serving" in log.read_bytes(), 300, "second worker", procs=(proc,), logs=(log,))
        yield proc.pid
    finally:
        stop(proc, grace=1)


async def pending_of(redis: Redis, system: System, consumer: str) -> int:
    stream = system.names.jobs_stream(system.model, "main")
    try:
        consumers = await redis.xinfo_consumers(stream, GROUP)
    except ResponseError:  # no stream or group yet: nobody holds anything
        return 0
    for info in consumers:
        if info["name"].decode() == consumer:
            return int(info["pending"])
    return 0


async def test_streams_survive_a_killed_worker(
    system: System, aclient: AsyncOpenAI, redis: Redis, doomed_worker: int
) -> None:
    # The tenant's stream exists and both workers block on it before the burst.
    await aclient.chat.completions.create(
        model=system.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    await asyncio.sleep(1.0)
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
    usage: list[int] = [0] * STREAMS
    finish: list[str | None] = [None] * STREAMS

    async def one(i: int) -> None:
        stream = await aclient.chat.completions.create(
            model=system.model,
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

    tasks = []
    for i in range(STREAMS):  # spaced arrivals alternate between the two workers' blocked reads
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.03)
    deadline = time.monotonic() + 60
    while await pending_of(redis, system, "doomed") == 0 or sum(1 for a in arrivals if a) < STREAMS // 2:
        assert time.monotonic() < deadline, "the second worker never took a job"
        await asyncio.sleep(0.05)
    held = await pending_of(redis, system, "doomed")
    os.killpg(doomed_worker, signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*tasks), 120)

    assert usage == [TOKENS] * STREAMS  # every token exactly once: the gateway refuses gaps and repeats
    assert finish == ["length"] * STREAMS
    gaps = [max((b - a for a, b in itertools.pairwise(t) if b > killed_at), default=0.0) for t in arrivals]
    recovery = max(gaps)
    print(f"killed a worker holding {held} of {STREAMS} streams; longest pause {recovery:.1f}s")
    assert held > 0
    assert recovery < 15
