"""A full worker makes room for another tenant: the flood's job it stops goes back to the queue and
resumes with nothing repeated or missing, on the real engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from openai import AsyncOpenAI

from control.processes import free_port
from shared.tenants import Tenant
from tests.conftest import System, create_tenant, forget_workers, worker_env
from tests.procs import spawn, stop, wait_until
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.e2e

MODEL = "preempt-demo"
TOKENS = 400
EXACT = {"ignore_eos": True}


@pytest.fixture(scope="module")
def full_worker(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker of its own model with two slots; its metrics URL."""
    logs = tmp_path_factory.mktemp("preempt")
    port = free_port()
    env = worker_env(
        system.env(),
        system.model_dir,
        SWITCHYARD_WORKER_ID="preempt-w",
        SWITCHYARD_SERVED_MODEL_NAME=MODEL,
        SWITCHYARD_CAPACITY="2",
        SWITCHYARD_PREEMPT="true",
        SWITCHYARD_METRICS_PORT=str(port),
    )
    log = logs / "worker.log"
    proc = spawn("worker", env, log)
    try:
        wait_until(
            lambda: b"worker preempt-w serving" in log.read_bytes(), 300, "worker", procs=(proc,), logs=(log,)
        )
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        stop(proc, grace=1)
        forget_workers(system, MODEL, "preempt-w")


@pytest.fixture
async def other(system: System) -> AsyncIterator[AsyncOpenAI]:
    """A second tenant's client."""
    key = await create_tenant(system.redis_url, system.names, Tenant(name=f"other-{uuid.uuid4().hex[:6]}"))
    async with AsyncOpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0, timeout=120) as c:
        yield c


async def _stream(
    client: AsyncOpenAI,
    prompt: str,
    tokens: int,
    under_way: asyncio.Event | None = None,
    heard: list[str] | None = None,
    index: int = 0,
) -> tuple[str, int, str | None, float]:
    """(text, completion tokens, finish reason, when it ended); ``under_way`` is set at the first
    20 characters, ``heard[index]`` holds the text so far."""
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,  # greedy: one answer per prompt, however often the job resumes
        extra_body=EXACT,
    )
    text, used, finish = "", 0, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if heard is not None:
                heard[index] = text
            if under_way is not None and len(text) >= 20:
                under_way.set()
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            used = chunk.usage.completion_tokens
    return text, used, finish, time.monotonic()


async def test_a_tenant_back_from_a_quiet_spell_does_not_wait_for_the_flood(
    aclient: AsyncOpenAI, other: AsyncOpenAI, full_worker: str
) -> None:
    begun = time.monotonic()
    while MODEL not in [m.id for m in (await aclient.models.list()).data]:
        assert time.monotonic() - begun < 30, "the gateway never listed the model"
        await asyncio.sleep(0.2)
    prompts = [f"the long story of ship {i}" for i in range(2)]
    # What the flood's answers are when nothing disturbs them (greedy: one answer per prompt).
    undisturbed = await asyncio.gather(*(_stream(aclient, p, TOKENS) for p in prompts))
    await _stream(other, "warm up", 1)  # the other tenant's stream exists: workers read it
    before = value(scrape(full_worker), "switchyard:worker_jobs_total", model=MODEL, outcome="preempted")

    under_way = [asyncio.Event() for _ in prompts]
    heard: list[str] = ["", ""]
    flood = [
        asyncio.create_task(_stream(aclient, p, TOKENS, e, heard, i))
        for i, (p, e) in enumerate(zip(prompts, under_way, strict=True))
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in under_way)), 60)  # both slots held, streaming
    assert not any(task.done() for task in flood)
    had = list(heard)  # what each flood client had when the other tenant asked
    text, used, finish, answered = await _stream(other, "a short question", 8)
    results = await asyncio.gather(*flood)

    assert used == 8 and finish == "length" and text
    assert answered < min(r[3] for r in results), "the other tenant waited for the flood to end"
    after = value(scrape(full_worker), "switchyard:worker_jobs_total", model=MODEL, outcome="preempted")
    assert after - before >= 1, "no job of the flood made room"
    for (now, used_now, finish_now, _), (then, used_then, finish_then, _), prefix in zip(
        results, undisturbed, had, strict=True
    ):
        # Every token once (the gateway refuses a resumed job whose first message or token count
        # does not follow on from what the client has), and what came before the stop unchanged.
        # The text after it is the engine's greedy continuation from a prefill of the tokens so
        # far, which on this random-weights model need not match the decode-by-decode one bit
        # for bit (vLLM does not promise batch-invariant results by default).
        assert (used_now, finish_now) == (used_then, finish_then) == (TOKENS, "length")
        assert now.startswith(prefix) and then.startswith(prefix)
