"""Agent frameworks and client libraries end to end, each called as its users call it: LangChain,
instructor, the OpenAI Agents SDK and litellm, against the session's gateway and worker.

The demo model has random weights, so what these tests hold is the shape: a tool call the library
turns into its own objects, arguments that match the tool's schema, a structured answer the library
validates into the user's model. Schemas are bounded (enums, literals, short strings), so a grammar
ends them well inside the token budget.

Each library is imported inside its tests: importing them takes seconds, and the runs that skip
end-to-end tests collect this file too.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field

from tests.conftest import System

pytestmark = pytest.mark.e2e

QUESTION = "What is the weather in Paris?"
USER = [{"role": "user", "content": QUESTION}]


class GetWeather(BaseModel):
    """Today's weather in a city."""

    city: Literal["Paris", "Rome", "Oslo"]
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    """The time of day in a zone."""

    zone: Literal["UTC", "CET"]


class Forecast(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool
    summary: str = Field(max_length=10)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Today's weather in a city.",
        "parameters": GetWeather.model_json_schema(),
    },
}


# --- LangChain ------------------------------------------------------------------------------------


def chat_model(system: System, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=system.model,
        base_url=f"{system.base_url}/v1",
        api_key=system.api_key,
        max_retries=0,
        timeout=60,
        **{"max_tokens": 120, **kwargs},
    )


TOOLS_BY_NAME: dict[str, type[BaseModel]] = {"GetWeather": GetWeather, "GetTime": GetTime}


def check_langchain_calls(calls: list[Any]) -> None:
    """Each call names a bound tool, carries an id, and its arguments validate into the tool's model."""
    assert calls
    assert len({call["id"] for call in calls}) == len(calls)
    for call in calls:
        TOOLS_BY_NAME[call["name"]].model_validate(call["args"])


@pytest.mark.parametrize("tool_choice", ["required", "any", "GetTime"])
def test_langchain_bind_tools_gives_tool_calls(system: System, tool_choice: str) -> None:
    # One call: under "required" a model with random weights may go on adding calls to the list.
    llm = chat_model(system).bind_tools(
        [GetWeather, GetTime], tool_choice=tool_choice, parallel_tool_calls=False
    )
    message = llm.invoke(QUESTION)
    named = tool_choice == "GetTime"
    # As OpenAI answers: a named tool's call ends with "stop", a required one with "tool_calls".
    assert message.response_metadata["finish_reason"] == ("stop" if named else "tool_calls")
    check_langchain_calls(message.tool_calls)
    assert not message.invalid_tool_calls
    assert len(message.tool_calls) == 1
    if named:
        assert message.tool_calls[0]["name"] == "GetTime"


def test_langchain_tool_choice_none_answers_in_text(system: System) -> None:
    llm = chat_model(system, max_tokens=8).bind_tools([GetWeather], tool_choice="none")
    message = llm.invoke(QUESTION)
    assert message.tool_calls == [] and message.invalid_tool_calls == []
    assert message.response_metadata["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("method", [None, "json_schema", "function_calling"])
def test_langchain_with_structured_output(system: System, method: str | None) -> None:
    llm = chat_model(system)
    structured = (
        llm.with_structured_output(Forecast)
        if method is None
        else llm.with_structured_output(Forecast, method=method)
    )
    assert isinstance(structured.invoke(QUESTION), Forecast)


def test_langchain_streams_a_plain_answer(system: System) -> None:
    llm = chat_model(system, max_tokens=8, stream_usage=True, extra_body={"ignore_eos": True})
    chunks = list(llm.stream(QUESTION))
    assert len(chunks) > 1
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert isinstance(whole.content, str)
    assert whole.response_metadata.get("finish_reason") == "length"
    assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] == 8


async def test_langchain_astreams_a_tool_call(system: System) -> None:
    llm = chat_model(system).bind_tools([GetWeather, GetTime], tool_choice="GetWeather")
    whole = None
    pieces = 0
    async for chunk in llm.astream(QUESTION):
        pieces += bool(chunk.tool_call_chunks)
        whole = chunk if whole is None else whole + chunk
    assert whole is not None and pieces > 1, "the arguments arrived in pieces"
    assert [chunk["name"] for chunk in whole.tool_call_chunks] == ["GetWeather"]
    assert whole.response_metadata["finish_reason"] == "stop"
    check_langchain_calls(whole.tool_calls)
    assert not whole.invalid_tool_calls


def test_langchain_sends_the_call_and_its_result_back(system: System) -> None:
    """The loop of a LangChain agent: its own AIMessage and a ToolMessage go back as history."""
    from langchain_core.messages import HumanMessage, ToolMessage

    first = chat_model(system).bind_tools([GetWeather], tool_choice="GetWeather").invoke(QUESTION)
    call = first.tool_calls[0]
    history = [
        HumanMessage(QUESTION),
        first,
        ToolMessage(content="21 degrees", tool_call_id=call["id"]),
    ]
    answer = chat_model(system, max_tokens=8).bind_tools([GetWeather]).invoke(history)
    assert answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    assert answer.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]


# --- instructor -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_returns_the_response_model(client: OpenAI, system: System, mode: str) -> None:
    import instructor

    patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    forecast = patched.chat.completions.create(
        model=system.model, messages=USER, response_model=Forecast, max_tokens=120
    )
    assert isinstance(forecast, Forecast)


async def test_instructor_async_client(aclient: AsyncOpenAI, system: System) -> None:
    import instructor

    patched = instructor.from_openai(aclient, mode=instructor.Mode.TOOLS)
    forecast = await patched.chat.completions.create(
        model=system.model, messages=USER, response_model=Forecast, max_tokens=120
    )
    assert isinstance(forecast, Forecast)


def test_instructor_streams_partial_models(client: OpenAI, system: System) -> None:
    import instructor

    patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    partials = list(
        patched.chat.completions.create_partial(
            model=system.model, messages=USER, response_model=Forecast, max_tokens=120
        )
    )
    assert len(partials) > 1
    Forecast.model_validate(partials[-1].model_dump())


# --- OpenAI Agents SDK ----------------------------------------------------------------------------


def agents_model(aclient: AsyncOpenAI, system: System) -> Any:
    """The Agents SDK's chat completions model on the session's gateway."""
    from agents import OpenAIChatCompletionsModel, set_tracing_disabled

    set_tracing_disabled(True)  # the SDK exports traces to OpenAI by default
    return OpenAIChatCompletionsModel(model=system.model, openai_client=aclient)


@pytest.mark.parametrize("behavior", ["stop_on_first_tool", "run_llm_again"])
async def test_agents_sdk_calls_the_function_tool_and_finishes(
    aclient: AsyncOpenAI, system: System, behavior: str
) -> None:
    from agents import Agent, ModelSettings, Runner, function_tool

    seen: list[tuple[str, str]] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome", "Oslo"], unit: Literal["celsius", "fahrenheit"]) -> str:
        """Today's weather in a city."""
        seen.append((city, unit))
        return f"21 degrees {unit} in {city}"

    agent = Agent(
        name="forecaster",
        instructions="Answer with the weather tool.",
        model=agents_model(aclient, system),
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=80),
        tool_use_behavior=behavior,  # type: ignore[arg-type]
    )
    result = await Runner.run(agent, QUESTION, max_turns=3)
    assert len(seen) == 1, "the tool ran once"
    items = [item.type for item in result.new_items]
    assert items[:2] == ["tool_call_item", "tool_call_output_item"]
    if behavior == "stop_on_first_tool":
        city, unit = seen[0]
        assert result.final_output == f"21 degrees {unit} in {city}"
        assert len(result.raw_responses) == 1
    else:
        # The SDK lets go of "required" after a call (so that an agent can end): the model's next
        # turn, with the tool's result in its prompt, is the answer. The demo model's random weights
        # may end that turn at once; the SDK then records no message, and the answer is empty.
        assert len(result.raw_responses) == 2 and isinstance(result.final_output, str)
        assert items[2:] == (["message_output_item"] if result.final_output else [])


async def test_agents_sdk_streamed_run(aclient: AsyncOpenAI, system: System) -> None:
    from agents import Agent, ModelSettings, Runner, function_tool

    @function_tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time of day in a zone."""
        return f"noon {zone}"

    agent = Agent(
        name="clock",
        instructions="Tell the time with the tool.",
        model=agents_model(aclient, system),
        tools=[get_time],
        model_settings=ModelSettings(tool_choice="get_time", max_tokens=60),
        tool_use_behavior="stop_on_first_tool",
    )
    result = Runner.run_streamed(agent, "What time is it?", max_turns=2)
    items = [
        event.item.type async for event in result.stream_events() if event.type == "run_item_stream_event"
    ]
    assert "tool_call_item" in items and "tool_call_output_item" in items
    assert result.final_output in ("noon UTC", "noon CET")


async def test_agents_sdk_output_type(aclient: AsyncOpenAI, system: System) -> None:
    from agents import Agent, ModelSettings, Runner

    agent = Agent(
        name="forecaster",
        instructions="Give the forecast.",
        model=agents_model(aclient, system),
        output_type=Forecast,
        model_settings=ModelSettings(max_tokens=80),
    )
    result = await Runner.run(agent, QUESTION, max_turns=1)
    assert isinstance(result.final_output, Forecast)


# --- litellm --------------------------------------------------------------------------------------


@pytest.fixture
def litellm_offline(monkeypatch: pytest.MonkeyPatch) -> Any:
    """litellm, told to use the model cost map it ships instead of fetching one."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    monkeypatch.setattr(litellm, "telemetry", False, raising=False)
    return litellm


def litellm_args(system: System) -> dict[str, Any]:
    return {
        "model": f"openai/{system.model}",
        "api_base": f"{system.base_url}/v1",
        "api_key": system.api_key,
        "messages": USER,
        "num_retries": 0,
        "timeout": 60,
    }


def test_litellm_required_tool_call(litellm_offline: Any, system: System) -> None:
    resp = litellm_offline.completion(
        **litellm_args(system),
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].function.name == "get_weather"
    GetWeather.model_validate_json(calls[0].function.arguments)


def test_litellm_response_format(litellm_offline: Any, system: System) -> None:
    schema = Forecast.model_json_schema()
    resp = litellm_offline.completion(
        **litellm_args(system),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "forecast", "schema": schema, "strict": True},
        },
        max_tokens=120,
    )
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    resp = litellm_offline.completion(**litellm_args(system), response_format=Forecast, max_tokens=120)
    Forecast.model_validate_json(resp.choices[0].message.content)


def test_litellm_streams_a_tool_call(litellm_offline: Any, system: System) -> None:
    chunks = list(
        litellm_offline.completion(
            **litellm_args(system),
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=120,
            stream=True,
        )
    )
    resp = litellm_offline.stream_chunk_builder(chunks)
    # The gateway ends a named call with "stop", as OpenAI does; litellm's stream reports any
    # answer that carried tool calls as "tool_calls".
    assert resp.choices[0].finish_reason == "tool_calls"
    calls = resp.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].function.name == "get_weather"
    GetWeather.model_validate_json(calls[0].function.arguments)
