"""Edges of the HTTP API end to end: what exactly goes over the wire, input the engine would refuse,
bodies that are not what they should be, a damaged heartbeat record, and a prompt far too big."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from redis.asyncio import Redis

from shared.tenants import Tenant
from tests.conftest import MAX_MODEL_LEN, System, create_tenant
from tests.test_e2e_api import entries_added

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "Tell me about the harbour."}]


def raw_stream(system: System, body: dict) -> bytes:  # type: ignore[type-arg]
    with httpx.stream(
        "POST", f"{system.base_url}/v1/chat/completions", json=body, headers=system.headers, timeout=60
    ) as resp:
        assert resp.status_code == 200
        return resp.read()


def test_sse_events_end_with_a_blank_line_as_openai_sends_them(system: System) -> None:
    body = {
        "model": system.model,
        "messages": USER,
        "max_tokens": 40,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    raw = raw_stream(system, body)
    assert b"\r" not in raw
    # Parsed the way vLLM's benchmark client does it: events split on "\n\n", "data: " stripped.
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 40
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(
    aclient: AsyncOpenAI, system: System
) -> None:
    stream = await aclient.chat.completions.create(
        model=system.model,
        messages=USER,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        extra_body={"ignore_eos": True},
    )
    counts = []
    async for chunk in stream:
        assert chunk.usage is not None, chunk
        counts.append(chunk.usage.completion_tokens)
    assert counts == sorted(counts) and counts[-1] == 30 and counts[0] >= 1
    plain = await aclient.chat.completions.create(
        model=system.model, messages=USER, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    with_usage = [chunk.usage is not None async for chunk in plain]
    assert with_usage[-1] and not any(with_usage[:-1])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": 100325800847805464576, "ignore_eos": True, "min_tokens": 1}, "top_k"),
        ({"top_k": 2**31}, "top_k"),
        ({"seed": 2**64 - 1}, "seed"),
    ],
)
async def test_engine_parameters_out_of_range_are_a_400_naming_them(
    aclient: AsyncOpenAI,
    system: System,
    redis: Redis,
    extra: dict,
    param: str,  # type: ignore[type-arg]
) -> None:
    before = await entries_added(redis, system)
    with pytest.raises(openai.BadRequestError) as info:
        await aclient.chat.completions.create(
            model=system.model, messages=USER, max_tokens=4, extra_body=extra
        )
    assert info.value.param == param
    assert await entries_added(redis, system) == before


def test_engine_parameters_at_their_bounds_are_served(client: OpenAI, system: System) -> None:
    for extra in (
        {"top_k": 2**31 - 1, "ignore_eos": True, "min_tokens": 1},
        {"seed": 2**63 - 1},
        {"seed": -(2**63)},
    ):
        resp = client.chat.completions.create(
            model=system.model, messages=USER, max_tokens=4, extra_body=extra
        )
        assert resp.choices[0].finish_reason in ("stop", "length"), extra


def test_bodies_that_are_not_json_objects_say_so(system: System) -> None:
    url = f"{system.base_url}/v1/chat/completions"
    not_json = httpx.post(url, content=b"model=x", headers={"content-type": "text/plain", **system.headers})
    assert not_json.status_code == 400
    assert "not valid JSON" in not_json.json()["error"]["message"]
    array = httpx.post(url, json=[1, 2], headers=system.headers)
    assert array.status_code == 400
    assert array.json()["error"]["message"] == "The request body must be a JSON object"


def test_http_errors_keep_their_headers(system: System) -> None:
    resp = httpx.get(f"{system.base_url}/v1/chat/completions", headers=system.headers)
    assert resp.status_code == 405
    assert resp.headers["allow"] == "POST"
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


async def test_an_undecodable_heartbeat_record_is_skipped(
    aclient: AsyncOpenAI, system: System, redis: Redis
) -> None:
    ghost = "garbled-" + uuid.uuid4().hex[:6]
    await redis.set(system.names.worker(ghost), b"{not a heartbeat", ex=30)
    await redis.zadd(system.names.workers(), {ghost: time.time() + 60})
    try:
        await asyncio.sleep(0.6)  # past the registry's cache
        assert [m.id async for m in aclient.models.list()] == [system.model]
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{system.base_url}/readyz")).status_code == 200
        resp = await aclient.completions.create(model=system.model, prompt="hi", max_tokens=2)
        assert resp.choices[0].text is not None
    finally:
        await redis.zrem(system.names.workers(), ghost)
        await redis.delete(system.names.worker(ghost))


def test_a_tenant_whose_token_limit_is_below_the_context_is_served_without_max_tokens(
    system: System,
) -> None:
    name = "small-tpm-" + uuid.uuid4().hex[:6]
    key = asyncio.run(
        create_tenant(system.redis_url, system.names, Tenant(name=name, tpm=MAX_MODEL_LEN // 2))
    )
    client = OpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0, timeout=60)
    resp = client.chat.completions.create(model=system.model, messages=USER)
    assert resp.usage is not None and resp.usage.total_tokens <= MAX_MODEL_LEN // 2


async def _gaps_while(aclient: AsyncOpenAI, system: System, work: asyncio.Future) -> tuple[float, object]:  # type: ignore[type-arg]
    """The longest wait between chunks of four streams running while ``work`` runs, and its result."""
    gaps: list[float] = []
    started = asyncio.Event()

    async def stream() -> None:
        chunks = await aclient.chat.completions.create(
            model=system.model, messages=USER, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        last = None
        async for _ in chunks:
            now = time.monotonic()
            if last is not None and started.is_set() and not work.done():
                gaps.append(now - last)
            last = now

    streams = [asyncio.create_task(stream()) for _ in range(4)]
    await asyncio.sleep(1.0)  # all four are generating
    started.set()
    result = await work
    await asyncio.gather(*streams)
    return max(gaps, default=0.0), result


async def test_a_huge_prompt_is_refused_at_once_and_stalls_no_other_stream(
    aclient: AsyncOpenAI, system: System
) -> None:
    huge = "harbour " * (3 * 1024 * 1024 // 8)  # 3 MB: cannot fit 1024 tokens whatever it encodes to
    long = "harbour lights " * 1300  # 20 kB: must be encoded to know, which happens off the event loop

    async def refuse(content: str) -> tuple[float, str | None]:
        begun = time.monotonic()
        with pytest.raises(openai.BadRequestError) as info:
            await aclient.chat.completions.create(
                model=system.model, messages=[{"role": "user", "content": content}], max_tokens=4
            )
        return time.monotonic() - begun, info.value.code

    for content in (huge, long):
        worst, (took, code) = await _gaps_while(aclient, system, asyncio.ensure_future(refuse(content)))
        assert code == "context_length_exceeded"
        assert took < 3.0, f"refusing a {len(content)}-character prompt took {took:.1f}s"
        assert worst < 1.0, f"other streams waited {worst:.2f}s between chunks"
