"""Streams that survive the client's own disconnect, and requests that run once under an
Idempotency-Key: real gateways (two processes), the real worker, Redis read back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from control.processes import free_port
from shared.messages import Tokens, decode_reply
from tests.conftest import System, create_tenant
from tests.procs import ready, spawn, stop, wait_until

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Tell me a long story about the harbour."}]
QUICK_GRACE = 1.5
"""The second gateway's grace: shorter than any of the long answers below takes on the demo model."""


@pytest.fixture(scope="module")
def second_gateway(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another gateway process on the same Redis: a client may come back through it. Its own
    grace period is short, for clients that leave it and never come back."""
    port = free_port()
    log = tmp_path_factory.mktemp("gw2") / "gateway.log"
    env = system.env(SWITCHYARD_PORT=str(port), SWITCHYARD_RESUME_GRACE=str(QUICK_GRACE))
    proc: subprocess.Popen[bytes] = spawn("gateway", env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url), 120, "second gateway", procs=(proc,), logs=(log,))
        yield url
    finally:
        stop(proc)


def body(tokens: int, seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "switchyard-demo",
        "messages": MESSAGES,
        "max_tokens": tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"resumable": True, "include_usage": True},
        "ignore_eos": True,
        **extra,
    }


@dataclass
class Received:
    ids: list[str] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    usage: int | None = None
    done: bool = False
    errors: list[dict[str, Any]] = field(default_factory=list)
    completion: str = ""
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    """Set at the first event."""

    async def first_event(self, reading: asyncio.Task[None]) -> None:
        """Wait for the first event of the stream ``reading`` reads (raising what it failed with)."""
        waiting = asyncio.ensure_future(self.opened.wait())
        await asyncio.wait({waiting, reading}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if reading.done():
            reading.result()


async def read(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    got: Received,
    headers: dict[str, str],
    stop_after: int | None = None,
    held: asyncio.Event | None = None,
) -> None:
    """Read a stream's events into ``got``; with ``stop_after``, drop the connection after that
    many content events, as a client whose network fails does (with ``held``, only once that is
    set: until then the connection stays open, unread)."""
    contents = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload, headers=headers) as resp:
        assert resp.status_code == 200, await resp.aread()
        event: dict[str, str] = {}
        async for line in resp.aiter_lines():
            if line.startswith(("data:", "id:")):
                key, _, value = line.partition(":")
                event[key] = value.strip()
                continue
            if line or "data" not in event:
                continue
            assert "id" in event, f"an event without an id: {event}"
            got.ids.append(event["id"])
            got.opened.set()
            data = event.pop("data")
            event.clear()
            if data == "[DONE]":
                got.done = True
                return
            chunk = json.loads(data)
            if "error" in chunk:
                got.errors.append(chunk["error"])
                continue
            got.completion = chunk["id"]
            if chunk.get("usage"):
                got.usage = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    got.text += choice["delta"]["content"]
                    contents += 1
                got.finish = choice["finish_reason"] or got.finish
            if stop_after is not None and contents >= stop_after:
                if held is not None:
                    await held.wait()
                return  # closing the response drops the connection mid-answer


async def produced(redis: Redis, system: System, completion: str) -> str:
    """What the job generated, as its worker published it (its progress list)."""
    job = "req_" + completion.removeprefix("chatcmpl-")
    history = [decode_reply(raw) for raw in await redis.lrange(system.names.progress(job), 0, -1)]
    return "".join(m.text for m in history if isinstance(m, Tokens))


async def test_a_dropped_stream_is_taken_up_at_another_gateway_with_nothing_repeated_or_missing(
    system: System, redis: Redis, second_gateway: str
) -> None:
    """64 clients, each dropped once mid-answer and back through the other gateway process.
    Answers long enough that the drop, after 3 to 7 events, always comes before the end however
    many tokens a busy worker puts in one event."""
    count, tokens = 64, 400

    async def one(i: int, client: httpx.AsyncClient) -> tuple[Received, Received]:
        first, rest = Received(), Received()
        payload = body(tokens, seed=i)
        await read(client, system.base_url, payload, first, system.headers, stop_after=3 + i % 5)
        assert not first.done and first.ids
        await asyncio.sleep(0.2 * (i % 4))  # some come back at once, some after a pause
        headers = {**system.headers, "last-event-id": first.ids[-1]}
        await read(client, second_gateway, payload, rest, headers)
        return first, rest

    async with httpx.AsyncClient(timeout=120) as client:
        results = await asyncio.gather(*(one(i, client) for i in range(count)))
    for first, rest in results:
        assert rest.done and not rest.errors and rest.finish == "length" and rest.usage == tokens
        assert rest.completion == first.completion
        assert not set(first.ids) & set(rest.ids), "an event was sent twice"
        assert first.text + rest.text == await produced(redis, system, first.completion)


async def test_a_stream_taken_up_before_its_first_gateway_saw_the_client_leave_runs_to_its_end(
    system: System, second_gateway: str
) -> None:
    """A client that comes back at once may take its stream up elsewhere before the gateway it
    left notices the dropped connection: that gateway must still count the take-up and leave the
    job running past its (short) grace. Eight long answers at once, so they outlast it."""

    async def one(i: int, client: httpx.AsyncClient) -> Received:
        first, rest, left = Received(), Received(), asyncio.Event()
        payload = body(900, seed=100 + i)
        dropping = asyncio.create_task(
            read(client, second_gateway, payload, first, system.headers, stop_after=2, held=left)
        )
        await first.first_event(dropping)
        headers = {**system.headers, "last-event-id": first.ids[-1]}
        taking_up = asyncio.create_task(read(client, system.base_url, payload, rest, headers))
        await rest.first_event(taking_up)
        left.set()  # the first connection drops only now, with the stream taken up already
        await dropping
        await taking_up
        return rest

    async with httpx.AsyncClient(timeout=90) as client:
        results = await asyncio.gather(*(one(i, client) for i in range(8)))
    for rest in results:
        assert rest.done and not rest.errors and rest.finish == "length" and rest.usage == 900


async def test_a_client_that_does_not_come_back_stops_its_job_after_the_grace(
    system: System, redis: Redis, second_gateway: str
) -> None:
    """Twelve long answers at once (together they outlast the short grace of the second gateway
    many times over), every client gone after two events."""
    dropped = [Received() for _ in range(12)]
    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(
            *(
                read(client, second_gateway, body(900, seed=i), got, system.headers, stop_after=2)
                for i, got in enumerate(dropped)
            )
        )
    jobs = ["req_" + got.completion.removeprefix("chatcmpl-") for got in dropped]
    assert not any([await redis.exists(system.names.cancelled(j)) for j in jobs]), "within the grace period"
    deadline = time.monotonic() + QUICK_GRACE + 15
    for job in jobs:
        while not await redis.exists(system.names.cancelled(job)):
            assert time.monotonic() < deadline, "nobody took the stream up, yet the job was not stopped"
            await asyncio.sleep(0.2)


async def test_another_tenant_or_another_request_cannot_take_the_stream_up(
    system: System, redis: Redis
) -> None:
    other = await create_tenant(system.redis_url, system.names, _tenant("resume-other"))
    async with httpx.AsyncClient(timeout=60) as client:
        got = Received()
        await read(client, system.base_url, body(200, seed=3), got, system.headers, stop_after=2)
        last = {"last-event-id": got.ids[-1]}
        url = f"{system.base_url}/v1/chat/completions"
        theirs = await client.post(
            url, json=body(200, seed=3), headers={"authorization": f"Bearer {other}", **last}
        )
        changed = await client.post(url, json=body(200, seed=4), headers={**system.headers, **last})
        garbled = await client.post(
            url, json=body(200, seed=3), headers={**system.headers, "last-event-id": "x"}
        )
    assert theirs.status_code == 404 and changed.status_code == 404
    assert garbled.status_code == 400 and garbled.json()["error"]["param"] == "Last-Event-ID"


def _tenant(name: str) -> Any:
    from shared.tenants import Tenant

    return Tenant(name=name)


def test_a_request_sent_again_with_its_idempotency_key_runs_once(client: OpenAI, system: System) -> None:
    key = {"Idempotency-Key": f"order-{time.time_ns()}"}
    kwargs: dict[str, Any] = {"model": system.model, "messages": MESSAGES, "max_tokens": 16, "seed": 1}
    first = client.chat.completions.create(**kwargs, extra_headers=key)
    again = client.chat.completions.create(**kwargs, extra_headers=key)
    assert again.id == first.id and again.choices[0].message.content == first.choices[0].message.content
    streamed = list(client.chat.completions.create(**kwargs, stream=True, extra_headers=key))
    assert {c.id for c in streamed} == {first.id}
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == first.choices[0].message.content
    )
    with pytest.raises(Exception) as info:
        client.chat.completions.create(**{**kwargs, "seed": 2}, extra_headers=key)
    assert getattr(info.value, "status_code", None) == 409


def test_a_text_completion_sent_again_with_its_idempotency_key_is_the_same_answer(
    client: OpenAI, system: System
) -> None:
    key = {"Idempotency-Key": f"score-{time.time_ns()}"}
    kwargs: dict[str, Any] = {
        "model": system.model,
        "prompt": "The harbour at night",
        "max_tokens": 8,
        "echo": True,
        "logprobs": 2,
        "seed": 3,
    }
    first = client.completions.create(**kwargs, extra_headers=key)
    again = client.completions.create(**kwargs, extra_headers=key)
    assert again.id == first.id
    assert again.choices[0].model_dump() == first.choices[0].model_dump()


def test_a_request_whose_client_left_before_its_end_is_not_waited_for_when_sent_again(
    client: OpenAI, system: System
) -> None:
    """Its job stopped with the client's connection: the request sent again under its key is told
    so at once (409 ``request_stopped``) rather than left waiting for the stall timeout."""
    key = {"Idempotency-Key": f"left-{time.time_ns()}"}
    kwargs: dict[str, Any] = {
        "model": system.model,
        "messages": MESSAGES,
        "max_tokens": 400,
        "extra_body": {"ignore_eos": True},
    }
    raw = client.chat.completions.with_raw_response.create(**kwargs, stream=True, extra_headers=key)
    stream = raw.parse()
    next(iter(stream))
    stream.close()
    redis = SyncRedis.from_url(system.redis_url)
    stopped = system.names.cancelled(raw.headers["x-request-id"])
    wait_until(lambda: bool(redis.exists(stopped)), 10, "the job stopped")
    begun = time.monotonic()
    with pytest.raises(openai.ConflictError) as info:
        client.chat.completions.create(**kwargs, extra_headers=key)
    assert info.value.code == "request_stopped" and time.monotonic() - begun < 10


async def test_a_request_sent_again_while_the_first_runs_hears_at_once_when_the_first_client_leaves(
    system: System, redis: Redis
) -> None:
    """The retry follows the first request's job; the first client leaves and the job stops: the
    worker says so on the job's stream, and the retry gets 409 ``request_stopped`` at once, not
    the stall timeout's 504 a minute later."""
    key = {"idempotency-key": f"abandoned-{time.time_ns()}", **system.headers}
    payload = {**body(900, seed=6), "stream_options": None}
    url = f"{system.base_url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", url, json=payload, headers=key) as first:
            job = first.headers["x-request-id"]
            lines = first.aiter_lines()  # held: a reader dropped early closes the connection
            await anext(lines)
            retry = asyncio.create_task(client.post(url, json={**payload, "stream": False}, headers=key))
            deadline = time.monotonic() + 30
            while not await redis.exists(system.names.attached(job)):
                assert time.monotonic() < deadline and not retry.done(), "the retry did not attach"
                await asyncio.sleep(0.05)
            assert not retry.done() and not await redis.exists(system.names.cancelled(job))
        left = time.monotonic()  # the first client's connection is closed
        answer = await retry
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "request_stopped"
    assert time.monotonic() - left < 15


async def test_requests_sent_again_while_the_first_runs_share_its_job(system: System) -> None:
    key = {"idempotency-key": f"burst-{time.time_ns()}", **system.headers}
    payload = {
        "model": "switchyard-demo",
        "messages": MESSAGES,
        "max_tokens": 200,
        "ignore_eos": True,
        "seed": 5,
    }
    async with httpx.AsyncClient(timeout=120) as client:
        url = f"{system.base_url}/v1/chat/completions"
        first = asyncio.create_task(client.post(url, json=payload, headers=key))
        await asyncio.sleep(0.3)
        answers = await asyncio.gather(
            first, *(client.post(url, json=payload, headers=key) for _ in range(3))
        )
    bodies = [a.json() for a in answers]
    assert all(a.status_code == 200 for a in answers), bodies
    assert len({b["id"] for b in bodies}) == 1
    assert len({b["choices"][0]["message"]["content"] for b in bodies}) == 1
    assert all(b["usage"]["completion_tokens"] == 200 for b in bodies)


async def test_a_tenant_at_its_rate_gets_the_answer_it_already_has(system: System) -> None:
    """Sending a request again with its Idempotency-Key is no new work: a tenant whose one request a
    minute is spent gets the first answer again, while a new request of it gets 429."""
    from shared.tenants import Tenant

    key = await create_tenant(system.redis_url, system.names, Tenant(name=f"once-{time.time_ns()}", rpm=1))
    client = OpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0, timeout=60)
    kwargs: dict[str, Any] = {"model": system.model, "messages": MESSAGES, "max_tokens": 8, "seed": 1}
    again = {"Idempotency-Key": f"once-{time.time_ns()}"}
    first = await asyncio.to_thread(client.chat.completions.create, **kwargs, extra_headers=again)
    repeated = await asyncio.to_thread(client.chat.completions.create, **kwargs, extra_headers=again)
    assert repeated.id == first.id
    with pytest.raises(Exception) as refused:
        await asyncio.to_thread(client.chat.completions.create, **kwargs)
    assert getattr(refused.value, "status_code", None) == 429
