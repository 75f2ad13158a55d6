"""Agents and structured output end to end, with the official SDK and its own helpers, on the real
engine and the demo model (random weights: whatever it says, the grammar must hold it to the shape).

The session's worker runs the demo model with vLLM's ``hermes`` tool-call parser, as
``vllm serve --enable-auto-tool-choice --tool-call-parser hermes`` would.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.conftest import System

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
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
    "function": {"name": "get_weather", "description": "Today's weather in a city.", "parameters": SCHEMA},
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
SCHEMAS = {"get_weather": SCHEMA, "get_time": TIME["function"]["parameters"]}  # type: ignore[index]


def check_calls(calls: list) -> None:  # type: ignore[type-arg]
    """Every call names a listed tool, has a fresh id, and its arguments match the tool's schema."""
    assert calls
    ids = {call.id for call in calls}
    assert len(ids) == len(calls) and all(i.startswith("chatcmpl-tool-") for i in ids)
    for call in calls:
        assert call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_answers_with_calls_that_match_the_schema(
    client: OpenAI, system: System
) -> None:
    # Parallel calls allowed: random weights decide how many; a seed keeps the answer the same
    # from run to run. No max_tokens: the whole context left after the prompt (with two tools it
    # is over 600 tokens of 1024) is the budget for a long list of calls.
    resp = client.chat.completions.create(
        model=system.model,
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        seed=11,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not choice.message.content
    check_calls(choice.message.tool_calls)  # type: ignore[arg-type]


def test_a_named_tool_is_called_and_stops_as_openai_does(client: OpenAI, system: System) -> None:
    resp = client.chat.completions.create(
        model=system.model,
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=100,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    calls = choice.message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_time"]
    check_calls(calls)


def test_one_call_only_when_parallel_calls_are_off(client: OpenAI, system: System) -> None:
    for seed in range(3):
        resp = client.chat.completions.create(
            model=system.model,
            messages=USER,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=200,
            seed=seed,
        )
        calls = resp.choices[0].message.tool_calls
        assert calls is not None and len(calls) == 1
        check_calls(calls)


def test_the_sdk_stream_helper_assembles_the_calls(client: OpenAI, system: System) -> None:
    deltas = []
    # The body of the required-tools test above (seeded, the whole context as budget), streamed.
    with client.chat.completions.stream(
        model=system.model, messages=USER, tools=[WEATHER, TIME], tool_choice="required", seed=11
    ) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                deltas.append(event.arguments_delta)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert deltas, "arguments were streamed"
    check_calls(choice.message.tool_calls)  # type: ignore[arg-type]


def test_the_agent_loop_sends_the_sdk_objects_back(client: OpenAI, system: System) -> None:
    """Append the SDK's own message (refusal, annotations, audio, function_call and all), then the
    tool's result, then ask again: each turn is accepted and rendered by the model's template."""
    messages: list = [{"role": "developer", "content": "Answer briefly."}, *USER]  # type: ignore[type-arg]
    # One call, seeded: random weights could otherwise write calls past the token budget.
    first = client.chat.completions.create(
        model=system.model,
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        seed=5,
    )
    assert first.choices[0].finish_reason == "tool_calls", first.choices[0]
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    messages.append(first.choices[0].message)
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'})
    second = client.chat.completions.create(
        model=system.model, messages=messages, tools=[WEATHER], max_tokens=8
    )
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]
    messages.append(second.choices[0].message)
    messages.append({"role": "user", "content": "Thanks!", "name": "ada"})
    third = client.chat.completions.create(model=system.model, messages=messages, max_tokens=4)
    assert third.choices[0].finish_reason in ("stop", "length")


class Forecast(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool
    summary: str = Field(max_length=10)


def test_parse_returns_the_pydantic_model(client: OpenAI, system: System) -> None:
    resp = client.chat.completions.parse(
        model=system.model, messages=USER, response_format=Forecast, max_tokens=100
    )
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, Forecast)
    assert resp.choices[0].finish_reason == "stop"


def test_parse_with_a_strict_tool_parses_its_arguments(client: OpenAI, system: System) -> None:
    resp = client.chat.completions.parse(
        model=system.model,
        messages=USER,
        tools=[openai.pydantic_function_tool(Forecast, name="report")],
        tool_choice="required",
        max_tokens=150,
    )
    call = resp.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert isinstance(call.function.parsed_arguments, Forecast)


def test_json_output_holds_to_the_schema_without_runaway_whitespace(client: OpenAI, system: System) -> None:
    for seed in range(3):
        resp = client.chat.completions.create(
            model=system.model,
            messages=USER,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": SCHEMA, "strict": True},
            },
            max_tokens=100,
            seed=seed,
        )
        text = resp.choices[0].message.content or ""
        assert resp.choices[0].finish_reason == "stop", text
        assert not re.search(r"\s{2,}", text)
        jsonschema.validate(json.loads(text), SCHEMA)
    resp = client.chat.completions.create(
        model=system.model,
        messages=USER,
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content or ""), dict)


def test_vllm_structured_outputs_extra(client: OpenAI, system: System) -> None:
    resp = client.chat.completions.create(
        model=system.model,
        messages=USER,
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[ab]"}},
    )
    assert re.fullmatch(r"[0-9]{3}-[ab]", resp.choices[0].message.content or "")
    resp = client.chat.completions.create(
        model=system.model,
        messages=USER,
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
    )
    assert resp.choices[0].message.content in ("yes", "no", "maybe")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
        ),
        ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_what_cannot_be_held_is_a_400_naming_it(
    client: OpenAI, system: System, extra: dict, param: str | None
) -> None:  # type: ignore[type-arg]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=system.model, messages=USER, max_tokens=5, **extra)
    body = info.value.body
    assert isinstance(body, dict)
    if param is not None:
        assert body["param"] == param, body


def test_logprobs_cover_every_token_streamed_or_not(client: OpenAI, system: System) -> None:
    resp = client.chat.completions.create(
        model=system.model,
        messages=USER,
        max_tokens=12,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 12
    # As vLLM reports them: a special token by its text (the answer's text skips it), and a token
    # that is part of a character as "" (the answer's text has "\ufffd" there).
    tokens = re.sub(r"<\|[a-z]+\|>|</?s>|<pad>", "", "".join(t.token for t in content))
    assert tokens == (resp.choices[0].message.content or "").replace("\ufffd", "")
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.bytes == list(token.token.encode())
    streamed = client.chat.completions.create(
        model=system.model,
        messages=USER,
        max_tokens=12,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    entries = [
        t
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for t in chunk.choices[0].logprobs.content or ()
    ]
    assert len(entries) == 12 and all(len(t.top_logprobs) == 2 for t in entries)


def test_template_controls_and_message_shapes(client: OpenAI, system: System) -> None:
    history = [*USER, {"role": "assistant", "content": "Once upon a time"}]
    plain = client.chat.completions.create(model=system.model, messages=history, max_tokens=2)
    continued = client.chat.completions.create(
        model=system.model,
        messages=history,
        max_tokens=2,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    # The last message stays open: no end of turn, no new assistant turn after it.
    assert continued.usage.prompt_tokens < plain.usage.prompt_tokens  # type: ignore[union-attr]
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert client.chat.completions.create(model=system.model, messages=parts, max_tokens=2).choices
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=system.model,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
            ],
            max_tokens=2,
        )
    assert info.value.body["param"] == "messages.0.content.0" and "image_url" in info.value.body["message"]  # type: ignore[index]


def test_fields_of_the_sdk_that_mean_nothing_here_are_accepted(client: OpenAI, system: System) -> None:
    resp = client.chat.completions.create(
        model=system.model,
        messages=USER,
        max_tokens=2,
        store=False,
        metadata={"run": "1"},
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="user-1",
        verbosity="low",
        modalities=["text"],
        reasoning_effort="low",
        user="u",
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    assert list(resp)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=system.model, messages=USER, max_tokens=2, extra_body={"bogus": 1}
        )
    assert info.value.body["param"] == "bogus"  # type: ignore[index]
