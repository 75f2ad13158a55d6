"""Answers parsed as vLLM's server parses them: tool calls and reasoning, whole or streamed in
coalesced messages of any size, with vLLM's own parsers on the demo model's tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from api.assembly import Meta
from api.chat.assembly import CHAT, ChatFull, ChatStream, escape_controls
from api.chat.protocol import ChatCompletionRequest
from serving.chat import Answering, ChatRenderer
from shared.messages import Final, Tokens, Usage
from worker.demo_model import ensure_demo_model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
USER = [{"role": "user", "content": "Weather in Paris?"}]
META = Meta(id="chatcmpl-1", created=1, model="m", family=CHAT)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    cache = os.environ.get("SWITCHYARD_TEST_MODEL_DIR")
    return AutoTokenizer.from_pretrained(ensure_demo_model(Path(cache) if cache else None))


def messages(tokenizer: Any, text: str, size: int, steps: bool = False) -> list[Tokens]:
    """``text`` as a worker sends it: its tokens coalesced ``size`` at a time, the last finishing."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) == text  # every token decodes on its own here
    out = []
    for seq, start in enumerate(range(0, len(ids), size)):
        chunk = pieces[start : start + size]
        out.append(
            Tokens(
                seq=seq + 1,
                index=0,
                text="".join(chunk),
                token_ids=tuple(ids[start : start + size]),
                finish_reason="stop" if start + size >= len(ids) else None,
                steps=tuple((len(p), 1) for p in chunk) if steps else None,
            )
        )
    return out


def plan_for(tokenizer: Any, answering: Answering, **body: Any) -> Any:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **body})
    plan = ChatRenderer(tokenizer).plan(request, answering, 20)
    prompt = tokenizer.encode(plan.text, add_special_tokens=False)
    return plan, prompt


def stream(plan: Any, prompt: list[int], replies: list[Tokens]) -> list[dict[str, Any]]:
    asm = ChatStream(META, include_usage=False, parsers=plan.parsers(1, prompt))
    chunks = [c for r in replies for c in asm.tokens(r)]
    return chunks + asm.final(
        Final(seq=99, finish_reasons=("stop",), usage=Usage(prompt_tokens=1, completion_tokens=1))
    )


def accumulate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client makes of the deltas (as the openai SDK's stream helper does)."""
    out: dict[str, Any] = {"content": "", "reasoning": "", "tool_calls": {}, "finish": None}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            out["content"] += delta.get("content") or ""
            out["reasoning"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or ():
                slot = out["tool_calls"].setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = slot["id"] or call.get("id")
                fn = call.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            out["finish"] = choice["finish_reason"] or out["finish"]
    return out


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


@pytest.mark.parametrize("size", [1, 3, 8, 1000])
def test_an_auto_tool_call_streams_the_same_whatever_the_coalescing(tokenizer: Any, size: int) -> None:
    plan, prompt = plan_for(tokenizer, Answering("hermes", True), tools=[WEATHER])
    got = accumulate(stream(plan, prompt, messages(tokenizer, CALL, size)))
    [call] = got["tool_calls"].values()
    assert call["name"] == "get_weather" and call["id"].startswith("chatcmpl-tool-")
    assert json.loads(call["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert got["finish"] == "tool_calls" and not got["content"].strip()


def test_the_whole_answer_parses_to_the_same_call(tokenizer: Any) -> None:
    plan, prompt = plan_for(tokenizer, Answering("hermes", True), tools=[WEATHER])
    full = ChatFull(META, parsers=plan.parsers(1, prompt))
    for reply in messages(tokenizer, CALL, 5):
        full.tokens(reply)
    body = full.response(
        Final(seq=9, finish_reasons=("stop",), usage=Usage(prompt_tokens=1, completion_tokens=1))
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


def test_without_a_tool_parser_auto_answers_in_text(tokenizer: Any) -> None:
    plan, prompt = plan_for(tokenizer, Answering(), tools=[WEATHER])
    got = accumulate(stream(plan, prompt, messages(tokenizer, CALL, 4)))
    assert got["content"] == CALL and not got["tool_calls"] and got["finish"] == "stop"


def test_required_calls_are_read_from_the_grammar_held_json(tokenizer: Any) -> None:
    plan, prompt = plan_for(tokenizer, Answering(), tools=[WEATHER], tool_choice="required")
    assert plan.structured_output is not None and '"minItems": 1' in (
        plan.structured_output.json_schema or ""
    )
    text = '[{"name":"get_weather","parameters":{"city":"Rome","unit":"fahrenheit"}}]'
    got = accumulate(stream(plan, prompt, messages(tokenizer, text, 6)))
    [call] = got["tool_calls"].values()
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {
        "city": "Rome",
        "unit": "fahrenheit",
    }
    assert got["finish"] == "tool_calls"


def test_a_named_call_takes_the_text_as_its_arguments_and_stops(tokenizer: Any) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    plan, prompt = plan_for(tokenizer, Answering("hermes", True), tools=[WEATHER], tool_choice=named)
    text = '{"city":"Oslo","unit":"celsius"}'
    got = accumulate(stream(plan, prompt, messages(tokenizer, text, 4)))
    [call] = got["tool_calls"].values()
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {
        "city": "Oslo",
        "unit": "celsius",
    }
    assert got["finish"] == "stop"


THINKING = "<think>Paris is in France.</think>It is sunny."


@pytest.mark.parametrize("size", [1, 4, 100])
def test_reasoning_comes_apart_from_the_answer(tokenizer: Any, size: int) -> None:
    plan, prompt = plan_for(tokenizer, Answering(reasoning_parser="deepseek_r1"))
    assert plan.steps, "a reasoning parser sees the output a step at a time"
    got = accumulate(stream(plan, prompt, messages(tokenizer, THINKING, size, steps=True)))
    assert got["reasoning"] == "Paris is in France." and got["content"] == "It is sunny."


def test_without_step_boundaries_deepseek_r1_would_leak_its_tag(tokenizer: Any) -> None:
    """Why token messages say where steps end: vLLM's deepseek_r1 parser skips ``<think>`` only
    when it arrives as a delta of its own."""
    plan, prompt = plan_for(tokenizer, Answering(reasoning_parser="deepseek_r1"))
    got = accumulate(stream(plan, prompt, messages(tokenizer, THINKING, 4, steps=False)))
    assert got["reasoning"].startswith("<think>")


def test_a_whole_reasoning_answer_counts_its_reasoning_tokens(tokenizer: Any) -> None:
    plan, prompt = plan_for(tokenizer, Answering(reasoning_parser="deepseek_r1"))
    full = ChatFull(META, parsers=plan.parsers(1, prompt))
    for reply in messages(tokenizer, THINKING, 3, steps=True):
        full.tokens(reply)
    body = full.response(
        Final(seq=9, finish_reasons=("stop",), usage=Usage(prompt_tokens=1, completion_tokens=12))
    )
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == "Paris is in France."
    assert message["content"] == "It is sunny."
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


def test_include_reasoning_false_drops_it(tokenizer: Any) -> None:
    plan, prompt = plan_for(tokenizer, Answering(reasoning_parser="deepseek_r1"), include_reasoning=False)
    got = accumulate(stream(plan, prompt, messages(tokenizer, THINKING, 1, steps=True)))
    assert got["reasoning"] == "" and got["content"] == "It is sunny."


def test_grammar_held_json_escapes_what_xgrammar_lets_into_strings() -> None:
    raw = '{"city":"Par\x1dis"}'
    fixed = escape_controls(raw)
    assert fixed == '{"city":"Par\\u001dis"}' and json.loads(fixed) == {"city": "Par\x1dis"}
    asm = ChatStream(META, include_usage=False, json_held=True)
    chunk = asm.tokens(Tokens(seq=1, index=0, text=raw, token_ids=(1,), finish_reason=None))[0]
    assert json.loads(chunk["choices"][0]["delta"]["content"]) == {"city": "Par\x1dis"}


def test_with_thinking_off_the_whole_answer_is_content_as_streamed(tokenizer: Any) -> None:
    """The prompt closed the reasoning: streamed or whole, the answer is content."""
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    plan, prompt = plan_for(tokenizer, Answering(reasoning_parser="deepseek_r1"), **off)
    assert plan.text.endswith("</think>\n\n")
    streamed = accumulate(stream(plan, prompt, messages(tokenizer, "It is sunny.", 2, steps=True)))
    full = ChatFull(META, parsers=plan.parsers(1, prompt))
    for reply in messages(tokenizer, "It is sunny.", 2, steps=True):
        full.tokens(reply)
    body = full.response(
        Final(seq=9, finish_reasons=("stop",), usage=Usage(prompt_tokens=1, completion_tokens=4))
    )
    message = body["choices"][0]["message"]
    assert streamed["content"] == message["content"] == "It is sunny."
    assert not streamed["reasoning"] and "reasoning" not in message
