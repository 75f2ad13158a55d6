"""Keys and limits through real gateways: the SDK's errors, headers, refunds, and one limit shared
by several gateway processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import openai
import pytest
from redis.asyncio import Redis

from control.processes import free_port
from shared.tenants import Tenant
from tests.conftest import System, create_tenant
from tests.procs import ready, spawn, stacks, stop, wait_until
from tests.test_e2e_faults import fake_model, forget_model, wait_for

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "hi"}]


async def tenant_key(system: System, tenant: Tenant) -> str:
    return await create_tenant(system.redis_url, system.names, tenant)


async def test_missing_or_wrong_key_is_401(system: System) -> None:
    for key in ("", "sy-000000000000-nope"):
        async with openai.AsyncOpenAI(
            base_url=f"{system.base_url}/v1", api_key=key or "x", max_retries=0
        ) as client:
            with pytest.raises(openai.AuthenticationError) as info:
                await client.chat.completions.create(model=system.model, messages=USER, max_tokens=1)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


async def test_rpm_limit_headers_and_429(system: System) -> None:
    key = await tenant_key(system, Tenant(name="rpm-" + uuid.uuid4().hex[:6], rpm=3))
    async with openai.AsyncOpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0) as client:
        for left in (2, 1, 0):
            raw = await client.chat.completions.with_raw_response.create(
                model=system.model, messages=USER, max_tokens=2
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            assert raw.headers["x-ratelimit-remaining-requests"] == str(left)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model=system.model, messages=USER, max_tokens=2)
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.code == "rate_limit_exceeded"


LONG = [{"role": "user", "content": "x " * 3000}]
"""Over the demo model's context once encoded, which only encoding it can tell."""


@pytest.mark.parametrize(
    "limits",
    [{"rpm": 1}, {"max_concurrent": 1}, {"tpm": 60}],
    ids=["requests per minute", "concurrency", "tokens per minute"],
)
async def test_a_tenant_over_its_limit_is_refused_before_its_prompt_is_encoded(
    system: System, limits: dict[str, int], aclient: openai.AsyncOpenAI
) -> None:
    """A request that would cost the gateway an encoding (up to 4 MB through the chat template) is
    refused at once while its tenant is over a limit; the other tenant is served all along."""
    if "tpm" in limits:  # exactly what the request below uses: its prompt and 60 tokens
        probe = await aclient.chat.completions.create(model=system.model, messages=USER, max_tokens=1)
        assert probe.usage is not None
        limits = {"tpm": probe.usage.prompt_tokens + 60}
    name = "pre-" + uuid.uuid4().hex[:6]
    key = await tenant_key(system, Tenant(name=name, **limits))  # type: ignore[arg-type]
    other = await tenant_key(system, Tenant(name="pre-other-" + uuid.uuid4().hex[:6]))
    async with (
        openai.AsyncOpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0) as client,
        openai.AsyncOpenAI(base_url=f"{system.base_url}/v1", api_key=other, max_retries=0) as others,
    ):
        # Under its limits the long prompt is encoded, and refused for what the encoding shows.
        with pytest.raises(openai.BadRequestError) as encoded:
            await others.chat.completions.create(model=system.model, messages=LONG, max_tokens=2)
        assert encoded.value.code == "context_length_exceeded" and "you requested" in encoded.value.message
        held = None
        if "max_concurrent" in limits:  # one request running holds the only slot
            held = await client.chat.completions.create(
                model=system.model,
                messages=USER,
                max_tokens=200,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            await anext(held)
        else:  # a minute's requests, or tokens, used up
            await client.chat.completions.create(
                model=system.model, messages=USER, max_tokens=60, extra_body={"ignore_eos": True}
            )
        try:
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model=system.model, messages=LONG, max_tokens=2)
            with pytest.raises(openai.RateLimitError):  # a text completion's long prompt the same
                await client.completions.create(model=system.model, prompt=LONG[0]["content"], max_tokens=2)
            served = await others.chat.completions.create(model=system.model, messages=USER, max_tokens=2)
            assert served.choices[0].finish_reason == "length"
        finally:
            if held is not None:
                await held.close()


def prefix_cache_hits(system: System) -> float:
    text = httpx.get(system.worker_metrics_url, timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total")
    )


async def hits_of(system: System, client: openai.AsyncOpenAI, prompt: str) -> float:
    """Prompt tokens vLLM's prefix cache served for one request of ``client``'s tenant."""
    before = prefix_cache_hits(system)
    await client.completions.create(model=system.model, prompt=prompt, max_tokens=1)
    await asyncio.sleep(0.3)  # the engine's stats come with its next output
    return prefix_cache_hits(system) - before


async def test_one_tenants_prompts_do_not_warm_another_tenants_prefix_cache(system: System) -> None:
    """Whether a prompt's prefix is cached shows in its time to first token; a tenant must not learn
    from it what another sent lately. Tenants of one cache group share the cache on purpose."""
    run = uuid.uuid4().hex[:6]
    tenants = [Tenant(name=f"salt-{n}-{run}") for n in ("a", "b")]
    tenants += [Tenant(name=f"salt-{n}-{run}", cache_group=f"team-{run}") for n in ("c", "d")]
    keys = [await tenant_key(system, t) for t in tenants]
    clients = [openai.AsyncOpenAI(base_url=f"{system.base_url}/v1", api_key=k, max_retries=0) for k in keys]
    a, b, c, d = clients
    words = ("harbour", "lantern", "quiet", "river", "stone", "market", "bridge", "meadow")
    document, other_document = (
        run + " " + " ".join(words[(i * step + i // 3) % len(words)] for i in range(250)) for step in (7, 5)
    )
    try:
        assert await hits_of(system, a, document) == 0, "a fresh document was cached already"
        assert await hits_of(system, b, document) == 0, "another tenant's prompt served from the cache"
        assert await hits_of(system, a, document) > 0, "a tenant's own prefix is not reused"
        assert await hits_of(system, c, other_document) == 0
        assert await hits_of(system, d, other_document) > 0, "tenants of one cache group do not share it"
    finally:
        for client in clients:
            await client.close()


async def test_unused_tokens_are_refunded_when_the_client_leaves(system: System, redis: Redis) -> None:
    tenant = Tenant(name="tpm-" + uuid.uuid4().hex[:6], tpm=5000)
    key = await tenant_key(system, tenant)
    body = {"model": system.model, "messages": USER, "max_tokens": 800, "ignore_eos": True, "stream": True}
    async with (
        httpx.AsyncClient(
            base_url=system.base_url, timeout=30, headers={"authorization": f"Bearer {key}"}
        ) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        remaining = int(r.headers["x-ratelimit-remaining-tokens"])
        assert remaining < 5000 - 800
        lines = r.aiter_lines()
        while not (await anext(lines)).startswith("data: {"):
            pass
    used_key = system.names.rate(tenant.name, "sum")

    async def refunded() -> bool:
        return int(await redis.get(used_key) or 0) < 400

    await wait_for(refunded, 5)


class Gateway(NamedTuple):
    port: int
    log: Path
    pid: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def three_gateways(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Gateway]]:
    logs = tmp_path_factory.mktemp("gateways")
    gateways = [Gateway(free_port(), logs / f"gw{i}.log") for i in range(3)]
    procs = [spawn("gateway", system.env(SWITCHYARD_PORT=str(g.port)), g.log) for g in gateways]
    try:
        for g, proc, i in zip(gateways, procs, range(3), strict=True):
            # Ready, not just alive: a gateway is ready once it has loaded the served model's
            # tokenizer, which 300 requests at once would otherwise all wait for.
            wait_until(lambda u=g.url: ready(u), 120, f"gateway {i}", procs=(proc,), logs=(g.log,))
        yield [g._replace(pid=proc.pid) for g, proc in zip(gateways, procs, strict=True)]
    finally:
        for proc in procs:
            stop(proc)


async def test_one_rpm_limit_across_three_gateways(
    system: System, redis: Redis, three_gateways: list[Gateway]
) -> None:
    model = "limited-" + uuid.uuid4().hex[:6]
    await fake_model(redis, system, model, live=True)  # admitted jobs just wait: no engine needed
    key = await tenant_key(system, Tenant(name="shared-" + uuid.uuid4().hex[:6], rpm=100))
    body = {"model": model, "messages": USER, "max_tokens": 4, "stream": True}
    statuses: list[int] = []
    slow: list[str] = []

    async def one(i: int) -> None:
        started = time.monotonic()
        try:
            async with clients[i % 3].stream("POST", "/v1/chat/completions", json=body) as r:
                statuses.append(r.status_code)
        except httpx.TimeoutException as exc:
            slow.append(f"request {i} to gateway {i % 3}: {exc!r} after {time.monotonic() - started:.1f}s")

    clients = [
        httpx.AsyncClient(
            base_url=g.url,
            timeout=30,
            headers={"authorization": f"Bearer {key}"},
            limits=httpx.Limits(max_connections=100),
        )
        for g in three_gateways
    ]
    try:
        await asyncio.sleep(0.6)  # every gateway's registry sees the model
        begun = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(300)))
        took = time.monotonic() - begun
    finally:
        for c in clients:
            await c.aclose()
        await forget_model(redis, system, model)
    assert not slow, f"{len(slow)} request(s) got no answer: {slow[:5]}" + "".join(
        f"\n--- {g.log.name}, with its stacks:\n{stacks(g.pid, g.log, tail=6000)}" for g in three_gateways
    )
    print(f"300 requests over 3 gateways in {took:.1f}s: {statuses.count(200)} admitted")
    assert took < 60  # all inside one window, so exactly the limit may pass
    assert statuses.count(200) == 100
    assert statuses.count(429) == 200
