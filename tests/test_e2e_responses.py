"""The Responses API end to end, with the official SDK (``responses.create``, ``.stream``,
``.parse``, ``.retrieve``, ``.cancel``, ``.delete``) and the OpenAI Agents SDK's default model, on
the real engine and the demo model (random weights: whatever it says, the grammar must hold it
to the shape, and every answer must be a well-formed response).

The session's worker parses answers with vLLM's ``hermes`` tool-call parser.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field
from redis import Redis

from control.processes import free_port
from shared.tenants import Tenant
from tests.conftest import System, create_tenant
from tests.procs import ready, spawn, stop, wait_until

pytestmark = pytest.mark.e2e

QUESTION = "What is the weather in Paris?"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Today's weather in a city.",
    "parameters": SCHEMA,
    "strict": True,
}
LONG = {"ignore_eos": True}
"""vLLM's extension: generate to max_output_tokens whatever the model says."""


def calls(response: Any) -> list[Any]:
    """The function calls of a response, each checked against the tool's schema."""
    found = [item for item in response.output if item.type == "function_call"]
    for call in found:
        assert call.name == "get_weather" and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), SCHEMA)
    assert len({c.call_id for c in found}) == len(found)
    return found


def settled(client: OpenAI, response_id: str, within: float = 90) -> Any:
    """Poll a background response until it ends."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        time.sleep(0.2)
    raise AssertionError(f"{response_id} still {response.status} after {within}s")


def test_a_whole_response_is_stored_and_retrieved(client: OpenAI, system: System) -> None:
    response = client.responses.create(
        model=system.model, input=QUESTION, instructions="Answer briefly.", max_output_tokens=8
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete") and response.model == system.model
    assert response.instructions == "Answer briefly." and response.max_output_tokens == 8
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.output_text == message.content[0].text
    assert response.usage is not None and response.usage.input_tokens > 0
    assert 0 < response.usage.output_tokens <= 8
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    again = client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()


def test_required_tools_then_a_second_turn_from_the_stored_one(client: OpenAI, system: System) -> None:
    # Random weights decide how many calls the answer holds: a seed keeps it the same from run to
    # run, and no max_output_tokens leaves it the whole context after the prompt to finish them.
    first = client.responses.create(
        model=system.model,
        input=QUESTION,
        instructions="Use the tools.",
        tools=[WEATHER],
        tool_choice="required",
        extra_body={"seed": 11},
    )
    assert first.status == "completed", first
    [call, *_] = calls(first)
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}
    second = client.responses.create(
        model=system.model,
        previous_response_id=first.id,
        input=[answer],
        tools=[WEATHER],
        max_output_tokens=4,
    )
    assert second.previous_response_id == first.id
    # The same turn sent whole, without the stored state: the question, the model's own calls sent
    # back as the SDK returned them, and the call's output. It renders to the same prompt exactly.
    stateless = client.responses.create(
        model=system.model,
        input=[{"role": "user", "content": QUESTION}, *first.output, answer],
        tools=[WEATHER],
        max_output_tokens=4,
    )
    assert second.usage is not None and stateless.usage is not None and first.usage is not None
    assert second.usage.input_tokens == stateless.usage.input_tokens > first.usage.input_tokens


def test_a_named_tool_choice_calls_that_tool(client: OpenAI, system: System) -> None:
    response = client.responses.create(
        model=system.model,
        input=QUESTION,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=100,
    )
    assert response.status == "completed" and len(calls(response)) == 1


def test_a_streamed_response_numbers_its_events_and_is_stored_as_streamed(
    client: OpenAI, system: System
) -> None:
    events = list(
        client.responses.create(model=system.model, input=QUESTION, max_output_tokens=12, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert kind in kinds, kind
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    end = events[-1].response  # type: ignore[union-attr]
    assert end.output_text == text and end.usage.output_tokens <= 12
    assert client.responses.retrieve(end.id).output_text == text


def test_the_sdk_stream_helper_assembles_calls_and_parsed_text(client: OpenAI, system: System) -> None:
    deltas = []
    # One call: the tool's schema bounds it well inside the budget (random weights could otherwise
    # go on calling until the budget runs out, and the response would end incomplete).
    with client.responses.stream(
        model=system.model,
        input=QUESTION,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
    ) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert deltas and final.status == "completed"
    [call, *_] = calls(final)
    assert "".join(deltas).startswith(call.arguments[:1])

    with client.responses.stream(
        model=system.model, input=QUESTION, text_format=Forecast, max_output_tokens=100
    ) as stream:
        parsed = stream.get_final_response().output_parsed
    assert isinstance(parsed, Forecast)


class Forecast(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool
    summary: str = Field(max_length=10)


def test_a_json_schema_format_holds_the_answer(client: OpenAI, system: System) -> None:
    for seed in range(2):
        response = client.responses.create(
            model=system.model,
            input=QUESTION,
            text={"format": {"type": "json_schema", "name": "weather", "schema": SCHEMA, "strict": True}},
            max_output_tokens=100,
            extra_body={"seed": seed},
        )
        assert response.status == "completed", response
        jsonschema.validate(json.loads(response.output_text), SCHEMA)
        assert response.text is not None and response.text.format.type == "json_schema"
    parsed = client.responses.parse(
        model=system.model, input=QUESTION, text_format=Forecast, max_output_tokens=100
    )
    assert isinstance(parsed.output_parsed, Forecast)


def test_log_probabilities_when_included(client: OpenAI, system: System) -> None:
    response = client.responses.create(
        model=system.model,
        input=QUESTION,
        max_output_tokens=6,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        extra_body=LONG,
    )
    [part] = response.output[0].content  # type: ignore[union-attr]
    assert part.logprobs is not None and len(part.logprobs) == 6
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in part.logprobs)


def test_store_false_keeps_nothing(client: OpenAI, system: System) -> None:
    response = client.responses.create(model=system.model, input=QUESTION, max_output_tokens=2, store=False)
    assert response.status in ("completed", "incomplete")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(
            model=system.model, input="And then?", previous_response_id=response.id, max_output_tokens=2
        )
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]


@pytest.fixture(scope="module")
def other(system: System) -> Iterator[OpenAI]:
    """A client of another tenant."""
    key = asyncio.run(
        create_tenant(system.redis_url, system.names, Tenant(name="resp-" + uuid.uuid4().hex[:6]))
    )
    with OpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0, timeout=60) as c:
        yield c


def test_another_tenants_response_is_not_found(client: OpenAI, other: OpenAI, system: System) -> None:
    mine = client.responses.create(model=system.model, input=QUESTION, max_output_tokens=2)
    for attempt in (
        lambda: other.responses.retrieve(mine.id),
        lambda: other.responses.cancel(mine.id),
        lambda: other.responses.delete(mine.id),
        lambda: other.responses.create(
            model=system.model, input="Hi", previous_response_id=mine.id, max_output_tokens=2
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert client.responses.retrieve(mine.id).id == mine.id  # untouched


def test_a_tenant_given_a_removed_tenants_name_finds_none_of_its_responses(system: System) -> None:
    name = "resp-" + uuid.uuid4().hex[:6]

    def client_of(key: str) -> OpenAI:
        return OpenAI(base_url=f"{system.base_url}/v1", api_key=key, max_retries=0, timeout=60)

    old = client_of(asyncio.run(create_tenant(system.redis_url, system.names, Tenant(name=name))))
    kept = old.responses.create(model=system.model, input=QUESTION, max_output_tokens=2)
    flags = ["--redis-url", system.redis_url, "--key-prefix", system.names.prefix]
    command = [sys.executable, "-m", "control.cli", "keys", "revoke", "--tenant", name, *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    new = client_of(asyncio.run(create_tenant(system.redis_url, system.names, Tenant(name=name))))
    for attempt in (
        lambda: new.responses.retrieve(kept.id),
        lambda: new.responses.create(
            model=system.model, input="And then?", previous_response_id=kept.id, max_output_tokens=2
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()


def test_delete_forgets_a_response(client: OpenAI, system: System) -> None:
    response = client.responses.create(model=system.model, input=QUESTION, max_output_tokens=2)
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_a_stored_response_is_not_replayed_as_a_stream(client: OpenAI, system: System) -> None:
    response = client.responses.create(model=system.model, input=QUESTION, max_output_tokens=2)
    resp = httpx.get(
        f"{system.base_url}/v1/responses/{response.id}", params={"stream": "true"}, headers=system.headers
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "stream"


def test_a_background_response_runs_to_its_stored_end(client: OpenAI, system: System) -> None:
    response = client.responses.create(
        model=system.model, input=QUESTION, background=True, max_output_tokens=8
    )
    assert response.status == "queued" and response.background and not response.output
    done = settled(client, response.id)
    assert done.status in ("completed", "incomplete") and done.output_text
    assert done.usage is not None and done.usage.output_tokens <= 8
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(response.id)  # it has ended


def test_a_cancelled_background_response_stays_cancelled(client: OpenAI, system: System) -> None:
    response = client.responses.create(
        model=system.model, input=QUESTION, background=True, max_output_tokens=900, extra_body=LONG
    )
    cancelled = client.responses.cancel(response.id)
    assert cancelled.status == "cancelled"
    assert client.responses.cancel(response.id).status == "cancelled"
    # The follower sees the cancel within a third of its lease, stops, and lets the lease go.
    lease = system.names.response_lease(response.id)
    redis = Redis.from_url(system.redis_url)
    deadline = time.monotonic() + 30
    while redis.exists(lease) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not redis.exists(lease)
    assert client.responses.retrieve(response.id).status == "cancelled"


def test_a_background_response_whose_gateway_dies_reads_as_failed(
    client: OpenAI, system: System, tmp_path: Path
) -> None:
    """The documented limit: a background response does not outlive the gateway following it; it
    ends failed (never in progress for ever) and its job is cancelled."""
    port = free_port()
    log = tmp_path / "gateway.log"
    gateway = spawn("gateway", system.env(SWITCHYARD_PORT=str(port), SWITCHYARD_WORKER_TTL="3"), log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: ready(url), 120, "second gateway ready", procs=(gateway,), logs=(log,))
        with OpenAI(base_url=f"{url}/v1", api_key=system.api_key, max_retries=0, timeout=60) as doomed:
            response = doomed.responses.create(
                model=system.model, input=QUESTION, background=True, max_output_tokens=900, extra_body=LONG
            )
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        ended = settled(client, response.id, within=40)
        assert ended.status == "failed" and ended.error is not None and ended.error.code == "gateway_lost"
        cancelled = Redis.from_url(system.redis_url).exists(
            system.names.cancelled(response.id.replace("resp_", "req_"))
        )
        assert cancelled, "the lost response's job was cancelled"
    finally:
        stop(gateway)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"input": []}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
                ]
            },
            "input.0.content.0",
        ),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"background": True, "store": False}, "background"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"top_logprobs": 21}, "top_logprobs"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}},
            "text.format",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": "word " * 5000}, "input"),
        ({"extra_body": {"bogus": 1}}, "bogus"),
    ],
)
def test_bad_requests_are_400s_naming_the_field_and_enqueue_nothing(
    system: System, extra: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": system.model, "input": QUESTION, "max_output_tokens": 4}
    body |= extra.pop("extra_body", {}) | extra
    resp = httpx.post(f"{system.base_url}/v1/responses", json=body, headers=system.headers, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.json()
    request_id = resp.headers["x-request-id"]
    assert Redis.from_url(system.redis_url).zscore(system.names.rate("main", "req"), request_id) is None


def test_an_unknown_previous_response_is_a_404_naming_it(client: OpenAI, system: System) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=system.model, input="Hi", previous_response_id="resp_nope")
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_the_agents_sdk_runs_a_tool_with_its_default_responses_model(system: System) -> None:
    from agents import (
        Agent,
        ModelSettings,
        Runner,
        function_tool,
        set_default_openai_client,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome", "Oslo"]) -> str:
        """Today's weather in a city."""
        asked.append(city)
        return "sunny, 21 degrees"

    async def run() -> Any:
        async with openai.AsyncOpenAI(
            base_url=f"{system.base_url}/v1", api_key=system.api_key, max_retries=0, timeout=120
        ) as client:
            set_default_openai_client(client, use_for_tracing=False)
            agent = Agent(
                name="forecaster",
                instructions="Use the tool, then report.",
                model=system.model,
                tools=[get_weather],
                output_type=Forecast,
                # Random weights: only what a grammar holds (one call, then the output type) is
                # sure to end before the token limit.
                model_settings=ModelSettings(
                    tool_choice="required", parallel_tool_calls=False, max_tokens=200
                ),
            )
            whole = await Runner.run(agent, QUESTION, max_turns=4)
            streamed = Runner.run_streamed(agent, QUESTION, max_turns=4)
            async for _ in streamed.stream_events():
                pass
            return whole, streamed

    for result in asyncio.run(run()):
        assert isinstance(result.final_output, Forecast)
        # Its default model speaks the Responses API: each turn is a response of ours.
        assert len(result.raw_responses) >= 2
        assert all((r.response_id or "").startswith("resp_") for r in result.raw_responses)
    assert len(asked) >= 2, "the agent called the tool in both runs"


# -- Idempotency-Key -------------------------------------------------------------------------------


def once() -> dict[str, str]:
    return {"Idempotency-Key": f"resp-{uuid.uuid4().hex}"}


def enqueued(system: System, request_id: str) -> bool:
    """Whether a request made a job of its own (a job's owner record is written as it is enqueued)."""
    return bool(Redis.from_url(system.redis_url).exists(system.names.owner(request_id)))


def attachments(system: System, response_id: str) -> int:
    """How many requests followed the response's job after the one that made it."""
    job = "req_" + response_id.removeprefix("resp_")
    return int(Redis.from_url(system.redis_url).get(system.names.attached(job)) or 0)


def test_a_response_sent_again_under_its_idempotency_key_is_the_stored_one(
    client: OpenAI, system: System
) -> None:
    key = once()
    asked: dict[str, Any] = {
        "model": system.model,
        "input": QUESTION,
        "max_output_tokens": 12,
        "extra_body": {"seed": 3},
    }
    raw = client.responses.with_raw_response.create(**asked, extra_headers=key)
    first = raw.parse()
    assert enqueued(system, raw.headers["x-request-id"])
    again = client.responses.with_raw_response.create(**asked, extra_headers=key)
    assert again.parse().model_dump() == first.model_dump()
    streamed = client.responses.with_raw_response.create(**asked, stream=True, extra_headers=key)
    events = list(streamed.parse())
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1].response.model_dump() == first.model_dump()  # type: ignore[union-attr]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == first.output_text
    # Both answered from the store: no job of their own, none followed.
    assert not enqueued(system, again.headers["x-request-id"])
    assert not enqueued(system, streamed.headers["x-request-id"])
    assert attachments(system, first.id) == 0
    with pytest.raises(openai.ConflictError) as info:
        client.responses.create(**{**asked, "max_output_tokens": 13}, extra_headers=key)
    assert info.value.code == "idempotency_key_reused"


async def test_responses_sent_again_while_the_first_streams_follow_its_job(system: System) -> None:
    key = once()
    asked: dict[str, Any] = {
        "model": system.model,
        "input": QUESTION,
        "max_output_tokens": 400,  # a few events in, far from the end however busy the worker
        "extra_body": LONG,
    }
    async with openai.AsyncOpenAI(
        base_url=f"{system.base_url}/v1", api_key=system.api_key, max_retries=0, timeout=120
    ) as client:
        raw = await client.responses.with_raw_response.create(**asked, stream=True, extra_headers=key)
        first: list[Any] = []
        started = asyncio.Event()

        async def read_first() -> None:
            async for event in raw.parse():
                first.append(event)
                started.set()

        reading = asyncio.create_task(read_first())
        await asyncio.wait_for(started.wait(), 60)
        whole, streamed = await asyncio.gather(
            client.responses.with_raw_response.create(**asked, extra_headers=key),
            client.responses.with_raw_response.create(**asked, stream=True, extra_headers=key),
        )
        again = [event async for event in streamed.parse()]
        await reading
        stored = await client.responses.retrieve(first[-1].response.id)
    end, answer = first[-1].response, whole.parse()
    assert end.status == "incomplete" and end.usage.output_tokens == 400
    assert answer.id == again[-1].response.id == end.id
    assert answer.output_text == again[-1].response.output_text == end.output_text
    assert answer.usage.output_tokens == again[-1].response.usage.output_tokens == 400
    assert answer.status == again[-1].response.status == "incomplete"
    assert "".join(e.delta for e in again if e.type == "response.output_text.delta") == end.output_text
    assert [e.sequence_number for e in again] == list(range(len(again)))
    assert stored.model_dump() == end.model_dump()  # stored once, by the first request
    assert attachments(system, end.id) == 2
    assert not enqueued(system, whole.headers["x-request-id"])
    assert not enqueued(system, streamed.headers["x-request-id"])


def test_a_response_not_stored_is_sent_again_from_its_jobs_replies(client: OpenAI, system: System) -> None:
    key = once()
    asked: dict[str, Any] = {"model": system.model, "input": QUESTION, "max_output_tokens": 8, "store": False}
    first = client.responses.create(**asked, extra_headers=key)
    again = client.responses.create(**asked, extra_headers=key)
    events = list(client.responses.create(**asked, stream=True, extra_headers=key))
    end = events[-1].response  # type: ignore[union-attr]
    assert again.id == end.id == first.id
    assert again.output_text == end.output_text == first.output_text
    assert again.usage == end.usage == first.usage
    assert attachments(system, first.id) == 2
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)  # nor stored by the requests sent again


def test_a_response_whose_client_left_before_its_end_is_not_waited_for_when_sent_again(
    client: OpenAI, system: System
) -> None:
    """The connection dropped mid-stream, so the job stopped: the request sent again under its key
    is told so at once (409 ``request_stopped``) rather than left waiting for the stall timeout."""
    key = once()
    asked: dict[str, Any] = {
        "model": system.model,
        "input": QUESTION,
        "max_output_tokens": 400,
        "extra_body": LONG,
    }
    raw = client.responses.with_raw_response.create(**asked, stream=True, extra_headers=key)
    stream = raw.parse()
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    stream.close()
    redis = Redis.from_url(system.redis_url)
    stopped = system.names.cancelled(raw.headers["x-request-id"])
    wait_until(lambda: bool(redis.exists(stopped)), 10, "the job stopped")
    begun = time.monotonic()
    with pytest.raises(openai.ConflictError) as info:
        client.responses.create(**asked, extra_headers=key)
    assert info.value.code == "request_stopped" and time.monotonic() - begun < 10


def test_a_background_response_sent_again_is_the_same_response(client: OpenAI, system: System) -> None:
    key = once()
    asked: dict[str, Any] = {
        "model": system.model,
        "input": QUESTION,
        "background": True,
        "max_output_tokens": 8,
    }
    first = client.responses.create(**asked, extra_headers=key)
    again = client.responses.with_raw_response.create(**asked, extra_headers=key)
    assert again.parse().id == first.id and first.status == "queued"
    assert not enqueued(system, again.headers["x-request-id"])
    done = settled(client, first.id)
    assert done.status in ("completed", "incomplete")
    assert client.responses.create(**asked, extra_headers=key).model_dump() == done.model_dump()


def test_another_tenants_idempotency_key_is_its_own(client: OpenAI, other: OpenAI, system: System) -> None:
    key = once()
    asked: dict[str, Any] = {"model": system.model, "input": QUESTION, "max_output_tokens": 4}
    mine = client.responses.create(**asked, extra_headers=key)
    raw = other.responses.with_raw_response.create(**asked, extra_headers=key)
    theirs = raw.parse()
    assert theirs.id != mine.id and enqueued(system, raw.headers["x-request-id"])
    assert other.responses.create(**asked, extra_headers=key).id == theirs.id
    assert client.responses.create(**asked, extra_headers=key).id == mine.id
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
