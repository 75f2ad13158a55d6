"""Agent traffic on a simulated worker, through a real gateway and the official SDK.

The worker advertises the demo model's ``hermes`` tool parser and the ``deepseek_r1`` reasoning
parser, so every answer thinks first and the gateway's real parsers take the simulated answers
apart: tool calls, JSON held to a schema, reasoning beside content.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from control.processes import free_port
from control.redis_server import EmbeddedRedis
from shared.names import Names
from shared.tenants import Tenant
from tests.conftest import create_tenant
from tests.procs import ready, spawn, stop, wait_until

pytestmark = pytest.mark.e2e

MODEL = "switchyard-demo"
USER: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS: Any = [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in SCHEMAS.items()]


class Forecast(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool
    summary: str = Field(max_length=10)


@pytest.fixture(scope="module")
def sim(
    redis_server: EmbeddedRedis, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpenAI]:
    names = Names(f"sytest-simagents-{uuid.uuid4().hex[:8]}")
    key = asyncio.run(create_tenant(redis_server.url, names, Tenant(name="agents")))
    port = free_port()
    env = {"REDIS_URL": redis_server.url, "SWITCHYARD_KEY_PREFIX": names.prefix}
    logs = tmp_path_factory.mktemp("sim-agents-logs")
    worker_log, gateway_log = logs / "worker.log", logs / "gateway.log"
    worker_env = {
        "SWITCHYARD_MODEL": str(demo_model_dir),
        "SWITCHYARD_SERVED_MODEL_NAME": MODEL,
        "SWITCHYARD_TOOL_CALL_PARSER": "hermes",
        "SWITCHYARD_REASONING_PARSER": "deepseek_r1",
        "SWITCHYARD_SIM_REASONING_TOKENS": "12",
    }
    worker = spawn("worker", {**env, **worker_env}, worker_log, "--engine", "sim", "--sim-preset", "cpu-demo")
    gateway = spawn("gateway", {**env, "SWITCHYARD_PORT": str(port)}, gateway_log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: ready(base_url),
            120,
            "simulated worker and gateway",
            (worker, gateway),
            (worker_log, gateway_log),
        )
        yield OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)
    finally:
        stop(gateway)
        stop(worker)


def reasoning_of(message: Any) -> str:
    return str((message.model_extra or {}).get("reasoning_content") or "")


def check_calls(calls: Any) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_gives_calls_that_match_the_schemas(sim: OpenAI) -> None:
    reply = sim.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=300, seed=1
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert reasoning_of(choice.message)
    check_calls(choice.message.tool_calls)


def test_auto_tool_choice_calls_a_listed_tool(sim: OpenAI) -> None:
    reply = sim.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=300, seed=2)
    assert reply.choices[0].finish_reason == "tool_calls"
    check_calls(reply.choices[0].message.tool_calls)


def test_a_json_schema_answer_parses_into_the_model(sim: OpenAI) -> None:
    reply = sim.chat.completions.parse(model=MODEL, messages=USER, response_format=Forecast, max_tokens=200)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Forecast)
    assert reasoning_of(choice.message)


def streamed(sim: OpenAI, **request: Any) -> tuple[str, str, int]:
    """A streamed answer's reasoning, content and tokens with log probabilities (two alternatives)."""
    reasoning = content = ""
    logprobs = 0
    for chunk in sim.chat.completions.create(model=MODEL, messages=USER, stream=True, **request):
        for choice in chunk.choices:
            reasoning += str((choice.delta.model_extra or {}).get("reasoning_content") or "")
            content += choice.delta.content or ""
            for entry in choice.logprobs.content or () if choice.logprobs else ():
                assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
                logprobs += 1
    return reasoning, content, logprobs


def test_reasoning_and_content_stream_apart(sim: OpenAI) -> None:
    logprobs = {"logprobs": True, "top_logprobs": 2, "extra_body": {"ignore_eos": True}}
    reasoning, content, tokens = streamed(sim, max_tokens=60, **logprobs)
    assert reasoning and content and "<think>" not in reasoning + content and "</think>" not in content
    assert tokens == 60
    # A prompt whose template turned thinking off gets an answer only. (Unstreamed, vLLM's
    # deepseek_r1 parser takes an answer without </think> for reasoning, whatever the prompt.)
    thinking_off = {"chat_template_kwargs": {"enable_thinking": False}}
    reasoning, content, _ = streamed(sim, max_tokens=20, extra_body=thinking_off)
    assert content and not reasoning
