"""The OpenAI API end to end: official SDK → gateway → Redis → worker → vLLM on the demo model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest
from openai import AsyncOpenAI, OpenAI
from redis.asyncio import Redis

from shared.settings import GatewaySettings
from tests.conftest import MAX_MODEL_LEN, System

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "Tell me about the harbour."}]
EXACT = {"ignore_eos": True}


def test_chat_non_streaming_returns_exactly_max_tokens(client: OpenAI, system: System) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=system.model, messages=USER, max_tokens=12, extra_body=EXACT
    )
    assert raw.headers["x-request-id"].startswith("req_")
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens > 0
    assert resp.choices[0].message.content


def test_chat_streaming_chunks_reassemble(client: OpenAI, system: System) -> None:
    stream = client.chat.completions.create(
        model=system.model,
        messages=USER,
        max_completion_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None and usage.completion_tokens == 20
    # Coalescing: fewer chunks than tokens is allowed, more is not.
    assert len(content) <= 20


def test_streaming_and_non_streaming_agree_under_a_seed(client: OpenAI, system: System) -> None:
    args = {"model": system.model, "messages": USER, "max_tokens": 16, "seed": 7, "temperature": 1.0}
    full = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**args, stream=True)
        if c.choices
    )
    again = client.chat.completions.create(**args).choices[0].message.content
    assert full == again == streamed


def test_stop_string_cuts_the_output(client: OpenAI, system: System) -> None:
    greedy = {"model": system.model, "messages": USER, "temperature": 0.0, "extra_body": EXACT}
    text = client.chat.completions.create(max_tokens=40, **greedy).choices[0].message.content or ""
    stop = next(
        text[i : i + 2]
        for i in range(5, len(text) - 2)
        if text[i : i + 2].strip() and text[i : i + 2] not in text[:i]
    )
    cut = client.chat.completions.create(max_tokens=40, stop=[stop], **greedy).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == text[: text.index(stop)]


def test_n_choices(client: OpenAI, system: System) -> None:
    resp = client.chat.completions.create(
        model=system.model, messages=USER, max_tokens=6, n=3, extra_body=EXACT
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage is not None and resp.usage.completion_tokens == 18
    stream = client.chat.completions.create(
        model=system.model, messages=USER, max_tokens=6, n=2, stream=True, extra_body=EXACT
    )
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_text_completions_string_and_token_ids(client: OpenAI, system: System) -> None:
    resp = client.completions.create(
        model=system.model, prompt="Once upon a time", max_tokens=9, extra_body=EXACT
    )
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason == "length" and resp.usage is not None
    assert resp.usage.completion_tokens == 9
    ids = client.completions.create(model=system.model, prompt=[5, 6, 7, 8], max_tokens=4, extra_body=EXACT)
    assert ids.usage is not None and ids.usage.prompt_tokens == 4
    stream = list(
        client.completions.create(
            model=system.model, prompt="Hello", max_tokens=8, stream=True, extra_body=EXACT
        )
    )
    assert stream[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in stream)


def test_default_completion_budget_is_openais_16(client: OpenAI, system: System) -> None:
    resp = client.completions.create(model=system.model, prompt="Hello", extra_body=EXACT)
    assert resp.usage is not None and resp.usage.completion_tokens == 16


def test_the_cpu_engine_runs_the_model_in_its_engine_core(client: OpenAI, system: System) -> None:
    """No separate model-runner process (vLLM's "VLLM::Worker"), whose spinning queues would starve
    the gateway and Redis on a small host; the engine core serves, the model answers."""
    reply = client.completions.create(model=system.model, prompt="harbour", max_tokens=3, extra_body=EXACT)
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    names = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            names.append(proc.name())
    assert any(name.startswith("VLLM::EngineCor") for name in names), names
    assert not any(name.startswith("VLLM::Worker") for name in names), names


def test_models_and_health(client: OpenAI, system: System) -> None:
    assert [m.id for m in client.models.list().data] == [system.model]
    assert client.models.retrieve(system.model).id == system.model
    assert httpx.get(f"{system.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{system.base_url}/readyz")
    # Anyone may ask: the answer names no model and no Redis.
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    # Metrics and the scaling figures are served on the metrics port, and on the API's not at all.
    for path in ("/metrics", "/scaling"):
        assert httpx.get(f"{system.base_url}{path}").status_code == 404, path
    assert "switchyard:requests_total" in httpx.get(system.gateway_metrics_url).text
    internal = system.gateway_metrics_url.removesuffix("/metrics")
    scaling = httpx.get(f"{internal}/scaling", params={"model": system.model}).json()
    assert scaling["model"] == system.model and scaling["known"]
    assert httpx.get(f"{internal}/v1/models").status_code == 404


async def test_fifty_concurrent_streams_all_complete_exactly(aclient: AsyncOpenAI, system: System) -> None:
    async def one(i: int) -> tuple[int, str]:
        stream = await aclient.chat.completions.create(
            model=system.model,
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
        text, tokens = [], -1
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return tokens, "".join(text)

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert [t for t, _ in results] == [32] * 50
    assert all(text for _, text in results)


# -- errors -----------------------------------------------------------------------------------------


async def entries_added(redis: Redis, system: System) -> int:
    stream = system.names.jobs_stream(system.model, "main")
    if not await redis.exists(stream):  # no job of this tenant yet in this session
        return 0
    info = await redis.xinfo_stream(stream)
    return (
        int(info["entries-added"])
        if "entries-added" in info
        else int(info["last-generated-id"].split(b"-")[0])
    )


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 7}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 99}, "n"),
        ({"extra_body": {"frobnicate": True}}, "frobnicate"),
        ({"extra_body": {"min_tokens": 50}, "max_tokens": 5}, "min_tokens"),
        ({"n": 2, "temperature": 0}, "n"),
        ({"max_tokens": MAX_MODEL_LEN}, "messages"),
        ({"extra_body": {"stop_token_ids": [10**6]}}, "stop_token_ids"),
    ],
)
async def test_bad_input_is_a_400_and_enqueues_nothing(
    aclient: AsyncOpenAI, system: System, redis: Redis, kwargs: dict, param: str
) -> None:
    before = await entries_added(redis, system)
    with pytest.raises(openai.BadRequestError) as info:
        await aclient.chat.completions.create(model=system.model, messages=USER, **kwargs)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param and body["type"] == "invalid_request_error"
    assert await entries_added(redis, system) == before


async def test_empty_prompt_is_a_400_and_enqueues_nothing(
    aclient: AsyncOpenAI, system: System, redis: Redis
) -> None:
    before = await entries_added(redis, system)
    with pytest.raises(openai.BadRequestError) as info:
        await aclient.completions.create(model=system.model, prompt="", max_tokens=2)
    assert info.value.param == "prompt"
    assert await entries_added(redis, system) == before


def test_context_length_exceeded_code(client: OpenAI, system: System) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=system.model, prompt=[1] * (MAX_MODEL_LEN - 3), max_tokens=10)
    assert info.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert info.value.code == "model_not_found"


def test_raw_http_errors_are_openai_shaped(system: System) -> None:
    url = f"{system.base_url}/v1/chat/completions"
    auth = system.headers
    cases = [
        (httpx.post(url, content=b"{not json", headers={"content-type": "application/json", **auth}), 400),
        (httpx.post(url, json={"model": system.model}, headers=auth), 400),
        (httpx.post(url, json=[1, 2], headers=auth), 400),
        (httpx.get(f"{system.base_url}/v1/nothing-here", headers=auth), 404),
        (httpx.post(url, content=b"x" * (5 * 1024 * 1024), headers=auth), 413),
        (httpx.post(url, json={"model": system.model}), 401),
        (httpx.get(f"{system.base_url}/v1/models", headers={"authorization": "Bearer sy-nope"}), 401),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        assert resp.headers["x-request-id"]


async def test_chunked_oversized_body_is_refused_without_reading_it_all(system: System, redis: Redis) -> None:
    # No Content-Length: only counting the bytes as they arrive can enforce the cap. The body is a
    # small valid request padded with whitespace (still valid JSON), so a gateway that read it all
    # and skipped the cap would enqueue a job.
    cap = GatewaySettings.model_fields["max_body_bytes"].default
    total, piece = 64 * 1024 * 1024, b" " * (64 * 1024)
    request = json.dumps({"model": system.model, "messages": USER, "max_tokens": 1}).encode()
    produced = 0

    def body() -> Iterator[bytes]:
        nonlocal produced
        produced += len(request)
        yield request
        while produced < total:
            produced += len(piece)
            yield piece

    def upload() -> httpx.Response:
        # The sync client: when the gateway closes mid-upload, it still reads the 413 that arrived
        # first, where the async transport drops it and reports a read error.
        return httpx.post(
            f"{system.base_url}/v1/chat/completions",
            content=body(),
            headers={"content-type": "application/json", **system.headers},
            timeout=30,
        )

    before = await entries_added(redis, system)
    started = time.monotonic()
    resp = await asyncio.to_thread(upload)
    elapsed = time.monotonic() - started
    assert "content-length" not in resp.request.headers
    assert resp.request.headers["transfer-encoding"] == "chunked"
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert resp.headers["x-request-id"]
    # Refused once past the cap: what was produced beyond it is at most what socket buffers held.
    assert cap < produced < total // 4, produced
    assert elapsed < 10
    assert await entries_added(redis, system) == before


def test_out_of_vocabulary_token_ids_are_rejected(client: OpenAI, system: System) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=system.model, prompt=[1, 10**7], max_tokens=2)
    assert info.value.param == "prompt"
