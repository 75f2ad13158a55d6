"""Redis killed and restarted empty under a running gateway and worker (their own Redis, not the
session's): clients in flight get errors, not hangs; requests during the outage are refused at
once; both processes reconnect on their own and serve again, the consumer group recreated.

An empty Redis has also lost every tenant and key; the test registers the same key again, as an
operator restoring them would (production Redis should persist: see docs/operations.md, "Redis restarts").
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from redis.asyncio import Redis

from control.processes import free_port
from control.redis_server import EmbeddedRedis
from shared.names import GROUP, Names
from shared.tenants import Tenant
from tests.conftest import System, create_tenant, worker_env
from tests.procs import ready, spawn, stop, wait_until

pytestmark = pytest.mark.e2e

MODEL = "restart-demo"


@dataclass
class Stack:
    redis: EmbeddedRedis
    names: Names
    key: str
    base_url: str
    procs: tuple[subprocess.Popen[bytes], ...]


@pytest.fixture
def stack(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("restart")
    server = EmbeddedRedis().start()
    names = Names("syrestart")
    key = asyncio.run(create_tenant(server.url, names, Tenant(name="main")))
    port = free_port()
    env = {"REDIS_URL": server.url, "SWITCHYARD_KEY_PREFIX": names.prefix}
    worker = spawn(
        "worker",
        worker_env(env, system.model_dir, SWITCHYARD_SERVED_MODEL_NAME=MODEL, SWITCHYARD_WORKER_ID="rs"),
        logs / "worker.log",
    )
    gateway = spawn(
        "gateway",
        {**env, "SWITCHYARD_PORT": str(port), "SWITCHYARD_WORKER_TTL": "3"},
        logs / "gateway.log",
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: ready(base_url),
            300,
            "gateway and worker on their own Redis",
            procs=(worker, gateway),
            logs=(logs / "worker.log", logs / "gateway.log"),
        )
        yield Stack(server, names, key, base_url, (worker, gateway))
    finally:
        stop(gateway)
        stop(worker)
        server.stop()


@pytest_asyncio.fixture
async def client(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{stack.base_url}/v1", api_key=stack.key, max_retries=0, timeout=60
    ) as c:
        yield c


async def ask(client: AsyncOpenAI) -> str:
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    return reply.choices[0].message.content or ""


async def long_stream(client: AsyncOpenAI, started: asyncio.Event) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "a long story"}],
        max_tokens=1000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for _ in stream:
        started.set()


async def test_redis_restart_errors_in_flight_requests_then_serves_again(
    stack: Stack, client: AsyncOpenAI
) -> None:
    assert await ask(client)

    starts = [asyncio.Event() for _ in range(4)]
    in_flight = [asyncio.create_task(long_stream(client, s)) for s in starts]
    await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 60)

    stack.redis.kill()
    killed = time.monotonic()
    outcomes = await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), 30)
    errored = time.monotonic() - killed
    assert all(isinstance(o, openai.APIError) for o in outcomes), outcomes

    # While Redis is down, nothing can be admitted or enqueued: refused at once, with a retry hint.
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        await ask(client)
    assert refused.value.status_code == 503
    assert refused.value.response.headers.get("retry-after")
    assert time.monotonic() - began < 10

    stack.redis.start()  # same port, no data: streams, groups, workers and keys are gone
    await create_tenant(stack.redis.url, stack.names, Tenant(name="main"), stack.key)
    restarted = time.monotonic()
    while True:
        try:
            assert await ask(client)
            break
        except (openai.APIStatusError, openai.APIConnectionError) as exc:
            assert time.monotonic() - restarted < 30, f"still failing 30 s after the restart: {exc}"
            await asyncio.sleep(0.5)
    recovered = time.monotonic() - restarted

    redis = Redis.from_url(stack.redis.url)
    try:
        groups = await redis.xinfo_groups(stack.names.jobs_stream(MODEL, "main"))
    finally:
        await redis.aclose()
    assert [g["name"].decode() for g in groups] == [GROUP]
    assert all(p.poll() is None for p in stack.procs), "gateway and worker ride it out, no restart"
    print(f"in-flight streams errored {errored:.1f}s after the kill; serving {recovered:.1f}s after restart")
