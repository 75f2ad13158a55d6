"""The request bodies the parity study sends to Switchyard and to vLLM's own server, byte for byte
the same to both (``model`` is filled in when sent), and what each answer must hold to.

Every body asks for greedy decoding (``temperature`` 0) with a ``seed``, so two servers running the
same model with the same engine settings should write the same text. Schemas are bounded
(``maxLength``, ``enum``): on the demo model's random weights an unbounded string runs until
``max_tokens`` on any server, and says nothing about the serving path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Today's weather in a city.",
        "parameters": WEATHER_SCHEMA,
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": TIME_SCHEMA}}
TOOL_SCHEMAS: dict[str, dict[str, Any]] = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
GREEDY = {"temperature": 0, "seed": 7}
STREAM = {"stream": True, "stream_options": {"include_usage": True}}
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6"
    "kgAAAABJRU5ErkJggg=="
)
"""A PNG image of one pixel."""


@dataclass(frozen=True)
class Holds:
    """What an answer's output must hold to, whatever the model says: tool calls whose arguments
    match their tool's schema (``tools``), content that is JSON (``json_object``), JSON matching a
    schema, a full match of a regex, or one of a few choices."""

    tools: dict[str, dict[str, Any]] | None = None
    json_object: bool = False
    json_schema: dict[str, Any] | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Case:
    """One request body, what it exercises, and what its answer must hold to."""

    name: str
    about: str
    body: dict[str, Any]
    holds: Holds | None = None
    tools: bool = False
    """Its answer depends on the server's tool-call configuration."""
    round_trip: dict[str, Any] | None = None
    """Sent through the official SDK as the first turn of an agent loop: the SDK's own assistant
    message, then this tool result, go back in a second turn (the answer compared is the second's)."""

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def _streamed(case: Case) -> Case:
    return Case(
        f"{case.name}_stream",
        f"{case.about}, streamed",
        case.body | STREAM,
        case.holds,
        case.tools,
        case.round_trip,
    )


def _both(case: Case) -> list[Case]:
    return [case, _streamed(case)]


REQUIRED = Case(
    "tool_required",
    "tool_choice required, two tools",
    {"messages": USER, "tools": [WEATHER, TIME], "tool_choice": "required", "max_tokens": 120, **GREEDY},
    Holds(tools=TOOL_SCHEMAS),
    tools=True,
)
NAMED = Case(
    "tool_named",
    "tool_choice naming one of two tools",
    {
        "messages": USER,
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "max_tokens": 120,
        **GREEDY,
    },
    Holds(tools={"get_time": TIME_SCHEMA}),
    tools=True,
)
AUTO = Case(
    "tool_auto",
    "tool_choice auto: the model may answer in text or call a tool",
    {"messages": USER, "tools": [WEATHER, TIME], "tool_choice": "auto", "max_tokens": 32, **GREEDY},
    tools=True,
)
NONE = Case(
    "tool_none",
    "tools offered with tool_choice none: an answer in text",
    {"messages": USER, "tools": [WEATHER, TIME], "tool_choice": "none", "max_tokens": 16, **GREEDY},
    tools=True,
)
TOOL_RESULT = Case(
    "tool_result_turn",
    "a tool's result sent back after the assistant's call",
    {
        "messages": [
            *USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "chatcmpl-tool-0123456789abcdef",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city": "Paris", "unit": "celsius"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "chatcmpl-tool-0123456789abcdef", "content": "18 C and sunny"},
        ],
        "tools": [WEATHER],
        "max_tokens": 24,
        **GREEDY,
    },
    tools=True,
)
JSON_OBJECT = Case(
    "json_object",
    "response_format json_object",
    {
        "messages": [{"role": "user", "content": "Give me a JSON object"}],
        "max_tokens": 64,
        "response_format": {"type": "json_object"},
        **GREEDY,
    },
    Holds(json_object=True),
)
JSON_SCHEMA = Case(
    "json_schema",
    "response_format json_schema, strict (what the SDK's parse() sends)",
    {
        "messages": [{"role": "user", "content": "A person as JSON"}],
        "max_tokens": 64,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
        **GREEDY,
    },
    Holds(json_schema=PERSON_SCHEMA),
)
REGEX = Case(
    "structured_regex",
    "structured_outputs regex (vLLM's extension)",
    {
        "messages": [{"role": "user", "content": "A phone number"}],
        "max_tokens": 24,
        "structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"},
        **GREEDY,
    },
    Holds(regex="[0-9]{3}-[0-9]{4}"),
)
CHOICE = Case(
    "structured_choice",
    "structured_outputs choice (vLLM's extension)",
    {
        "messages": [{"role": "user", "content": "yes or no?"}],
        "max_tokens": 24,
        "structured_outputs": {"choice": ["yes", "no", "maybe"]},
        **GREEDY,
    },
    Holds(choice=("yes", "no", "maybe")),
)
PLAIN = Case(
    "plain_chat",
    "a plain chat turn",
    {"messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 24, **GREEDY},
)
TWO = Case(
    "two_choices",
    "n 2: two choices of one prompt, sampled with a seed",
    {
        "messages": [{"role": "user", "content": "Hello, how are you?"}],
        "max_tokens": 8,
        "n": 2,
        "temperature": 1.0,
        "seed": 7,
    },
)
REFUSED = Case(
    "sampling_refused",
    "n 2 with greedy decoding, which vLLM's sampling parameters refuse",
    {"messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 8, "n": 2, **GREEDY},
)
LOGPROBS = Case(
    "logprobs_top3",
    "logprobs with the top 3 alternatives",
    {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "logprobs": True,
        "top_logprobs": 3,
        **GREEDY,
    },
)
DEVELOPER = Case(
    "developer_role",
    "a developer message and a named user",
    {
        "messages": [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": "Hi", "name": "ada"},
        ],
        "max_tokens": 24,
        **GREEDY,
    },
)
CONTINUE = Case(
    "continue_final_message",
    "continue_final_message: the assistant's last message is carried on",
    {
        "messages": [
            {"role": "user", "content": "Tell me a story"},
            {"role": "assistant", "content": "Once upon a time"},
        ],
        "add_generation_prompt": False,
        "continue_final_message": True,
        "max_tokens": 24,
        **GREEDY,
    },
)
ROUND_TRIP = Case(
    "sdk_round_trip",
    "the SDK's own assistant message (tool_choice required) and the tool's result sent back",
    {
        "messages": [{"role": "developer", "content": "Answer briefly."}, *USER],
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 120,
        **GREEDY,
    },
    tools=True,
    round_trip={"follow_up": {"role": "tool", "content": '{"celsius": 21}'}, "max_tokens": 16},
)
MIN_OVER_MAX = Case(
    "min_over_max_stream",
    "min_tokens above max_tokens, which vLLM's sampling parameters refuse, streamed",
    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "min_tokens": 8, **GREEDY, **STREAM},
)
BAD_SCHEMA = Case(
    "bad_schema",
    "a json_schema that cannot compile (type 'strin')",
    {
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 24,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "bad",
                "schema": {"type": "object", "properties": {"a": {"type": "strin"}}},
            },
        },
        **GREEDY,
    },
)
IMAGE = Case(
    "image_part",
    "an image part sent to a text-only model",
    {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": PIXEL}},
                ],
            }
        ],
        "max_tokens": 24,
        **GREEDY,
    },
)

CASES: tuple[Case, ...] = (
    *_both(PLAIN),
    *_both(TWO),
    *_both(REQUIRED),
    *_both(NAMED),
    *_both(AUTO),
    NONE,
    *_both(TOOL_RESULT),
    JSON_OBJECT,
    *_both(JSON_SCHEMA),
    REGEX,
    CHOICE,
    *_both(LOGPROBS),
    DEVELOPER,
    *_both(CONTINUE),
    ROUND_TRIP,
    *_both(BAD_SCHEMA),
    *_both(REFUSED),
    MIN_OVER_MAX,
    IMAGE,
)
"""Every body the study sends, in order."""

CHECKED_IN_CI = (
    "sdk_round_trip",
    "tool_required",
    "tool_required_stream",
    "json_schema",
    "logprobs_top3_stream",
)
"""The bodies the end-to-end test compares on every run (the agent loop's most used shapes)."""


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)
