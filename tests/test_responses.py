"""The Responses API without an engine: the request's bounds, its conversion to the chat request it
runs as (vLLM's own conversion), and its answers, whole or as typed events, assembled from worker
replies with vLLM's parsers on the demo model's tokenizer and read back by the openai SDK's own
stream accumulator."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from openai import omit
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import ValidationError
from transformers import AutoTokenizer

from api.assembly import Meta, StreamAssembler
from api.chat.assembly import CHAT, ChatFull, ChatStream
from api.errors import InvalidRequest
from api.responses.assembly import ResponseEvents, completed, replayed, skeleton
from api.responses.protocol import ResponsesRequest
from gateway.app import validation_error
from serving.chat import Answering, ChatRenderer
from serving.responses import Previous, renamed, turn
from shared.messages import Final, Logprobs, Tokens, Usage
from worker.demo_model import ensure_demo_model

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
    "strict": True,
}
META = Meta(id="chatcmpl-1", created=1, model="m", family=CHAT)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
THINKING = "<think>Paris is in France.</think>It is sunny."


def body(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "Weather in Paris?", **fields})


def refused(fields: dict[str, Any]) -> InvalidRequest:
    """The 400 a body gets, wherever it is caught: schema, conversion, or the chat request."""
    try:
        request = body(**fields)
    except ValidationError as exc:
        return validation_error([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
    with pytest.raises(InvalidRequest) as info:
        turn(request, None)
    return info.value


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"bogus": 1}, "bogus"),
        ({"input": []}, "input"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input.0.content.0.text"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0",
        ),
        ({"input": [{"type": "function_call_output", "output": "1"}]}, "input.0.call_id"),
        (
            {"input": [{"type": "reasoning", "summary": [], "encrypted_content": "x"}]},
            "input.0.encrypted_content",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [{**WEATHER, "name": "a b"}]}, "tools.0.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"background": True, "store": False}, "background"),
        ({"background": True, "stream": True}, "background"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        (
            {"text": {"format": {"type": "json_object"}}, "structured_outputs": {"regex": "a+"}},
            "structured_outputs",
        ),
    ],
)
def test_invalid_bodies_name_their_param(fields: dict[str, Any], param: str) -> None:
    assert refused(fields).param == param


def test_unknown_item_types_are_refused_plainly() -> None:
    err = refused({"input": [{"type": "image_generation_call", "id": "x"}]})
    assert "not served here" in err.message


def test_every_field_of_the_sdk_is_accepted() -> None:
    """Every parameter of the SDK's ``responses.create`` is a field here (honoured, ignored, or
    refused with a 400 naming it), never an unknown one."""
    from openai.types.responses.response_create_params import ResponseCreateParamsStreaming

    assert set(ResponseCreateParamsStreaming.__annotations__) <= set(ResponsesRequest.model_fields)


def test_the_input_becomes_chat_messages_as_vllm_renders_them() -> None:
    first = turn(
        body(
            instructions="Be brief.",
            input=[
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "one"}, {"type": "input_text", "text": "two"}],
                }
            ],
        ),
        None,
    )
    assert first.chat.messages[0].role == "system" and first.chat.messages[0].content == "Be brief."
    assert [p.text for p in first.chat.messages[1].content] == ["one", "two"]  # type: ignore[union-attr]
    assert first.chat.add_generation_prompt and not first.chat.continue_final_message
    # The SDK's own output items sent back: two calls in a row make one assistant message.
    history = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "type": "function_call",
            "call_id": "c1",
            "name": "get_weather",
            "arguments": "{}",
            "id": "fc_1",
            "status": "completed",
        },
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "21"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "25"}]},
    ]
    chat = turn(body(input=history, tools=[WEATHER]), None).chat
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "tool"]
    assert [c.id for c in chat.messages[1].tool_calls or ()] == ["c1", "c2"]
    assert chat.messages[3].tool_call_id == "c2" and chat.messages[3].text() == "25"


def test_an_unfinished_assistant_message_is_continued() -> None:
    partial = {
        "type": "message",
        "role": "assistant",
        "id": "msg_1",
        "status": "incomplete",
        "content": [{"type": "output_text", "text": "Once upon", "annotations": []}],
    }
    chat = turn(body(input=[{"role": "user", "content": "Tell a story"}, partial]), None).chat
    assert chat.continue_final_message and not chat.add_generation_prompt
    assert chat.messages[-1].content == "Once upon"


def test_tools_choices_formats_and_logprobs_become_the_chat_fields() -> None:
    chat = turn(
        body(
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=20,
            reasoning={"effort": "low", "summary": "auto"},
            include=["message.output_text.logprobs"],
            top_logprobs=3,
            temperature=0.5,
            seed=7,
        ),
        None,
    ).chat
    assert chat.tools and chat.tools[0].function.name == "get_weather" and chat.tools[0].function.strict
    assert chat.tool_choice.function.name == "get_weather"  # type: ignore[union-attr]
    assert chat.max_completion_tokens == 20 and chat.reasoning_effort == "low"
    assert chat.logprobs and chat.top_logprobs == 3
    assert chat.temperature == 0.5 and chat.seed == 7
    assert turn(body(top_logprobs=3), None).chat.logprobs is None  # not asked for in include
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    held = turn(body(text={"format": {"type": "json_schema", "name": "x", "schema": schema}}), None).chat
    assert held.structured_outputs is not None and held.structured_outputs.json_ == schema
    plain = turn(body(text={"format": {"type": "json_object"}}), None).chat
    assert plain.structured_outputs is not None and plain.structured_outputs.json_object
    assert turn(body(text={"format": {"type": "text"}}), None).chat.structured_outputs is None


def test_a_second_turn_continues_from_the_stored_conversation_and_output() -> None:
    first = turn(body(instructions="Be brief.", tools=[WEATHER]), None)
    output = [
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "Hm."}],
            "status": "completed",
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "c1",
            "name": "get_weather",
            "arguments": '{"city":"Paris","unit":"celsius"}',
            "status": "completed",
        },
    ]
    then = body(input=[{"type": "function_call_output", "call_id": "c1", "output": "21"}], tools=[WEATHER])
    second = turn(then, Previous(first.conversation, output))
    messages = [m.model_dump(exclude_none=True) for m in second.chat.messages]
    # The earlier instructions do not carry over; the call and its output follow the question.
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["reasoning"] == "Hm." and messages[1]["tool_calls"][0]["id"] == "c1"
    assert second.conversation[-1] == {"role": "tool", "content": "21", "tool_call_id": "c1"}


def test_chat_errors_name_the_responses_field() -> None:
    request = body(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}})
    for chat_param, param in [
        ("messages", "input"),
        ("structured_outputs", "text.format"),
        ("max_tokens", "max_output_tokens"),
        ("tools.0.function.parameters", "tools.0.parameters"),
        ("reasoning_effort", "reasoning.effort"),
        ("top_logprobs", "top_logprobs"),
    ]:
        assert renamed(InvalidRequest("x", param=chat_param), request).param == param


# -- answers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    cache = os.environ.get("SWITCHYARD_TEST_MODEL_DIR")
    return AutoTokenizer.from_pretrained(ensure_demo_model(Path(cache) if cache else None))


def replies(tokenizer: Any, text: str, size: int, finish: str = "stop") -> list[Tokens]:
    """``text`` as a worker sends it: coalesced ``size`` tokens a message, step boundaries said."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    return [
        Tokens(
            seq=n + 1,
            index=0,
            text="".join(pieces[start : start + size]),
            token_ids=tuple(ids[start : start + size]),
            finish_reason=finish if start + size >= len(ids) else None,
            steps=tuple((len(p), 1) for p in pieces[start : start + size]),
        )
        for n, start in enumerate(range(0, len(ids), size))
    ]


def final(n: int, finish: str = "stop") -> Final:
    return Final(seq=999, finish_reasons=(finish,), usage=Usage(prompt_tokens=10, completion_tokens=n))


def planned(tokenizer: Any, answering: Answering, request: ResponsesRequest) -> tuple[Any, list[int]]:
    plan = ChatRenderer(tokenizer).plan(turn(request, None).chat, answering, 20)
    return plan, tokenizer.encode(plan.text, add_special_tokens=False)


def streamed(events: ResponseEvents, messages: list[Tokens], last: Final) -> list[dict[str, Any]]:
    return decoded(events.start() + [f for r in [*messages, last] for f in events.events(r)])


def decoded(frames: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for frame in frames:
        name, data = frame.decode().removesuffix("\n\n").split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        out.append(event)
    return out


def sdk_reads(events: list[dict[str, Any]], tools: Any = omit) -> Any:
    """The response the openai SDK's stream helper accumulates from the events (it checks that
    every delta lands in an item it was told of, and that the end agrees with what streamed)."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=tools, text_format=omit)
    for event in events:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=event))  # type: ignore[arg-type]
    return state._completed_response


def response(request: ResponsesRequest) -> dict[str, Any]:
    return skeleton(request, "resp_1", 1, "m")


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_a_streamed_tool_call_is_read_back_whole_by_the_sdk(tokenizer: Any, size: int) -> None:
    request = body(tools=[WEATHER])
    plan, prompt = planned(tokenizer, Answering("hermes", True), request)
    parsers = plan.parsers(1, prompt)
    chat = ChatStream(META, include_usage=False, parsers=parsers)
    events = streamed(
        ResponseEvents(response(request), chat, parsers[0]), replies(tokenizer, CALL, size), final(30)
    )
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "response.function_call_arguments.delta" in kinds and "response.output_text.delta" not in kinds
    got = sdk_reads(events, [WEATHER])
    assert got.status == "completed" and got.usage.output_tokens == 30
    [call] = got.output
    assert (
        call.type == "function_call"
        and call.name == "get_weather"
        and call.call_id.startswith("chatcmpl-tool-")
    )
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}


def test_reasoning_and_text_stream_as_two_items_and_match_the_whole_answer(tokenizer: Any) -> None:
    request = body(reasoning={"effort": "high"})
    plan, prompt = planned(tokenizer, Answering(reasoning_parser="deepseek_r1"), request)
    parsers = plan.parsers(1, prompt)
    chat = ChatStream(META, include_usage=False, parsers=parsers)
    events = streamed(
        ResponseEvents(response(request), chat, parsers[0]), replies(tokenizer, THINKING, 2), final(14)
    )
    got = sdk_reads(events)
    assert [item.type for item in got.output] == ["reasoning", "message"]
    assert got.output[0].content[0].text == "Paris is in France." and got.output_text == "It is sunny."
    assert got.usage.output_tokens_details.reasoning_tokens > 0
    texts = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(texts) == "It is sunny."
    # Not streamed: the same items from the chat answer.
    full = ChatFull(META, parsers=plan.parsers(1, prompt))
    for reply in replies(tokenizer, THINKING, 3):
        full.tokens(reply)
    whole = completed(response(request), full.response(final(14)), logprobs=False)
    sdk = SDKResponse.model_validate(whole)
    assert [i.type for i in sdk.output] == ["reasoning", "message"] and sdk.output_text == "It is sunny."
    assert whole["usage"]["output_tokens_details"]["reasoning_tokens"] > 0


def test_a_plain_answer_cut_by_max_output_tokens_is_incomplete(tokenizer: Any) -> None:
    request = body(max_output_tokens=4)
    chat = StreamAssembler(META, include_usage=False)
    events = streamed(
        ResponseEvents(response(request), chat),
        replies(tokenizer, "It is sunny", 2, "length"),
        final(4, "length"),
    )
    assert events[-1]["type"] == "response.incomplete"
    end = events[-1]["response"]
    assert end["status"] == "incomplete" and end["incomplete_details"] == {"reason": "max_output_tokens"}
    assert end["output"][0]["content"][0]["text"] == "It is sunny"
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 1
    assert kinds.index("response.content_part.added") < kinds.index("response.output_text.delta")
    assert kinds.index("response.output_text.done") < kinds.index("response.content_part.done")


def test_an_error_event_ends_a_broken_stream_and_the_sdk_raises_it() -> None:
    events = ResponseEvents(response(body()), StreamAssembler(META, include_usage=False))
    events.start()
    frame = events.error(
        {"error": {"message": "lost", "type": "server_error", "param": None, "code": "worker_lost"}}
    )
    data = json.loads(frame.decode().split("\n")[1].removeprefix("data: "))
    assert data["type"] == "error" and data["code"] == "worker_lost" and data["sequence_number"] == 2
    assert data["error"]["message"] == "lost"  # what the SDK raises as an APIError


def test_log_probabilities_go_with_the_text_when_asked(tokenizer: Any) -> None:
    request = body(include=["message.output_text.logprobs"], top_logprobs=1)
    chat = ChatStream(META, include_usage=False, top=1)
    messages = [
        Tokens(
            seq=1,
            index=0,
            text="Hi",
            token_ids=(5,),
            logprobs=Logprobs(sampled=(-0.5,), texts=("Hi",), top=(((5, -0.5, "Hi"),),)),
        ),
        Tokens(
            seq=2,
            index=0,
            text="!",
            token_ids=(6,),
            finish_reason="stop",
            logprobs=Logprobs(sampled=(-1.0,), texts=("!",), top=(((6, -1.0, "!"),),)),
        ),
    ]
    live = ResponseEvents(response(request), chat, None, logprobs=True)
    events = streamed(live, messages, final(2))
    got = sdk_reads(events)
    [part] = got.output[0].content
    assert [lp.token for lp in part.logprobs] == ["Hi", "!"] and part.logprobs[0].top_logprobs[
        0
    ].logprob == -0.5
    assert live.result is not None
    again = decoded(replayed(live.result))
    deltas = [e["logprobs"] for e in again if e["type"] == "response.output_text.delta"]
    assert deltas == [[lp.model_dump() for lp in part.logprobs]]
    assert sdk_reads(again).model_dump() == got.model_dump()


def same_kinds_in_a_row_as_one(events: list[dict[str, Any]]) -> list[str]:
    kinds = [e["type"] for e in events]
    return [kind for i, kind in enumerate(kinds) if i == 0 or kinds[i - 1] != kind]


@pytest.mark.parametrize(
    ("request_fields", "answering", "text", "tools"),
    [
        ({"tools": [WEATHER]}, Answering("hermes", True), CALL, [WEATHER]),
        ({"reasoning": {"effort": "high"}}, Answering(reasoning_parser="deepseek_r1"), THINKING, omit),
        ({"max_output_tokens": 4}, Answering(), "It is sunny", omit),
    ],
)
def test_a_response_that_ended_streams_again_as_it_streamed_live(
    tokenizer: Any, request_fields: dict[str, Any], answering: Answering, text: str, tools: Any
) -> None:
    """A stored response asked for again as a stream (under an Idempotency-Key): its events say
    what the live ones said, each item's deltas in one, and end with the response as it was."""
    request = body(**request_fields)
    plan, prompt = planned(tokenizer, answering, request)
    parsers = plan.parsers(1, prompt)
    chat = ChatStream(META, include_usage=False, parsers=parsers)
    live = ResponseEvents(response(request), chat, parsers[0] if parsers else None)
    first = streamed(live, replies(tokenizer, text, 2), final(30))
    assert live.result is not None
    again = decoded(replayed(live.result))
    assert [e["sequence_number"] for e in again] == list(range(len(again)))
    assert same_kinds_in_a_row_as_one(again) == same_kinds_in_a_row_as_one(first)
    assert again[0] == first[0] and again[-1]["response"] == first[-1]["response"]
    assert sdk_reads(again, tools).model_dump() == sdk_reads(first, tools).model_dump()


def test_the_skeleton_echoes_the_request() -> None:
    request = body(
        instructions="Be brief.",
        tools=[WEATHER],
        tool_choice="required",
        metadata={"run": "1"},
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        temperature=0.3,
    )
    echo = SDKResponse.model_validate(skeleton(request, "resp_1", 5, "m"))
    assert echo.instructions == "Be brief." and echo.metadata == {"run": "1"} and echo.temperature == 0.3
    assert echo.tool_choice == "required" and echo.tools[0].name == "get_weather"
    assert echo.text.format.type == "json_schema" and echo.status == "in_progress"  # type: ignore[union-attr]
