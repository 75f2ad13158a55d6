"""The parity study's comparison of two answers (pure): shapes, folded streams, what an answer must
hold to, and which differences are explained."""

from __future__ import annotations

from typing import Any

from loadtest.parity import read_stream
from loadtest.paritycases import CASES, TIME_SCHEMA, Holds, case
from loadtest.parityreport import judge_case
from loadtest.parityshape import Answer, Difference, Output, compare, held, output, same_text, shape


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "choices": [choice], **extra}


def usage_chunk(**extra: Any) -> dict[str, Any]:
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    return {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage, **extra}


def test_a_shape_is_every_path_with_the_types_found_there() -> None:
    found = shape([{"a": [1, "x", {"b": None}], "c": 1.5}, {"a": [], "c": True}])
    assert found == {
        "": frozenset({"object"}),
        "a": frozenset({"array"}),
        "a[]": frozenset({"integer", "string", "object"}),
        "a[].b": frozenset({"null"}),
        "c": frozenset({"number", "boolean"}),
    }


def test_a_missing_branch_is_reported_once_not_with_all_below_it() -> None:
    vllm = Answer(
        200, body={"choices": [{"message": {"content": "", "tool_calls": [{"id": "x", "type": "f"}]}}]}
    )
    ours = Answer(200, body={"choices": [{"message": {"content": None}}]})
    assert [str(d) for d in compare(vllm, ours)] == [
        "body: choices[].message.content: vLLM string, Switchyard null",
        "body: choices[].message.tool_calls: vLLM array, Switchyard absent",
    ]


def test_chunks_are_compared_by_kind_so_one_kind_cannot_hide_another() -> None:
    vllm = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "hi"}, "stop"),
        usage_chunk(system_fingerprint="fp"),
    ]
    ours = [
        chunk({"role": "assistant", "content": ""}, system_fingerprint=None),
        chunk({"content": "hi"}, "stop", system_fingerprint=None),
        usage_chunk(system_fingerprint=None),
    ]
    found = compare(Answer(200, events=vllm, done=True), Answer(200, events=ours, done=True))
    assert {(d.part, d.path, d.kind) for d in found} == {
        ("any chunk", "system_fingerprint", "types differ"),
        ("first chunk", "system_fingerprint", "only Switchyard"),
        ("finish chunk", "system_fingerprint", "only Switchyard"),
        ("usage chunk", "system_fingerprint", "types differ"),
    }


def test_a_stream_folds_into_the_message_a_client_assembles() -> None:
    call = {"index": 0, "id": "t", "type": "function", "function": {"name": "get_time", "arguments": '{"zo'}}
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": None, "tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": None, "arguments": 'ne": "UTC"}'}}]}),
        chunk({}, "tool_calls"),
        usage_chunk(),
    ]
    out = output(Answer(200, events=events, done=True))
    assert out.tool_calls == [("get_time", '{"zone": "UTC"}')]
    assert (out.finish_reason, out.prompt_tokens, out.completion_tokens) == ("tool_calls", 5, 3)
    assert held(Holds(tools={"get_time": TIME_SCHEMA}), out) == ""
    compact = Output(content=None, tool_calls=[("get_time", '{"zone":"UTC"}')])
    assert same_text(out, compact)  # the same call, written with other spacing


def test_what_breaks_the_schema_says_why() -> None:
    tools = Holds(tools={"get_time": TIME_SCHEMA})
    assert "no tool call" in (held(tools, Output(content="<tool_call>{", finish_reason="length")) or "")
    assert "not of type 'object'" in (held(tools, Output(tool_calls=[("get_time", "204.1")])) or "")
    assert "cut at max_tokens" in (
        held(Holds(json_object=True), Output(content="{ ", finish_reason="length")) or ""
    )
    assert held(Holds(choice=("yes", "no")), Output(content="no")) == ""
    assert held(None, Output(content="anything")) is None
    assert held(tools, Output(error="400")) is None


def test_server_sent_events_are_read_as_a_client_reads_them() -> None:
    lines = [
        'data: {"a": 1}',
        "",
        ": ping",
        "",
        "event: error",
        'data: {"message": "x"}',
        "",
        "data: [DONE]",
        "",
    ]
    assert read_stream(iter(lines)) == ([{"a": 1}, {"error": {"message": "x"}}], True)
    assert read_stream(iter(['data: {"a": 1}', ""])) == ([{"a": 1}], False)


def test_known_differences_are_explained_and_new_ones_are_not() -> None:
    body = case("plain_chat")
    vllm = Answer(
        200,
        body={
            "choices": [{"message": {"content": "x"}, "finish_reason": "length", "stop_reason": None}],
            "system_fingerprint": "vllm-0.32.0",
        },
    )
    ours = Answer(
        200,
        body={
            "choices": [{"message": {"content": "x"}, "finish_reason": "length"}],
            "system_fingerprint": None,
        },
    )
    result = judge_case(body, "hermes", vllm, ours)
    assert result.verdict == "match (intended differences)" and result.same_text
    ours.body["choices"][0]["message"]["content"] = 7
    result = judge_case(body, "hermes", vllm, ours)
    assert result.verdict == "mismatch (unexplained)"
    assert Difference("body", "choices[].message.content", ("string",), ("integer",)) in result.differences


def test_every_body_has_a_unique_name_and_the_ci_set_exists() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert all(not c.body.get("stream") or c.name.endswith("_stream") for c in CASES)


def test_every_choice_of_n_is_folded_and_compared() -> None:
    def two(first: str, second: str) -> list[dict[str, Any]]:
        events = [chunk({"role": "assistant", "content": first}, "length")]
        other = chunk({"role": "assistant", "content": second}, "length")
        other["choices"][0]["index"] = 1
        return [*events, other, usage_chunk()]

    streamed = output(Answer(200, events=two("a", "b"), done=True))
    assert (streamed.content, streamed.others, streamed.completion_tokens) == ("a", ["b"], 3)
    whole = output(
        Answer(
            200,
            body={
                "choices": [
                    {"index": 0, "message": {"content": "a"}, "finish_reason": "length"},
                    {"index": 1, "message": {"content": "b"}, "finish_reason": "length"},
                ]
            },
        )
    )
    assert same_text(streamed, whole)
    assert not same_text(streamed, output(Answer(200, events=two("a", "c"), done=True)))
