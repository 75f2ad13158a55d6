"""Chat completions (``POST /v1/chat/completions``): the request body, validated strictly, and the
shape of the answer.

Every field of the openai SDK's chat completion parameters is accepted: most are honoured, and the
few that mean nothing for an open-weight model served here (``audio``, ``modalities``,
``prediction``, ``web_search_options``, ``store``, ``metadata``, ``service_tier``, the prompt-cache
hints, ``safety_identifier``, ``verbosity``, and the deprecated ``functions`` / ``function_call``)
are accepted and ignored, as vLLM's server does; ``docs/api.md`` lists which is which. So is every
field of the SDK's own answer sent back in the next turn (``refusal``, ``annotations``, ``audio``,
``function_call``, ``reasoning``). Besides, vLLM's chat extensions that clients of ``vllm serve``
send (``structured_outputs``, ``chat_template_kwargs``, ``add_generation_prompt``,
``continue_final_message``, ``documents``, ``include_reasoning``, ``skip_special_tokens``, ...).
Unknown fields are refused, as OpenAI refuses them.

What needs the model (its chat template, its tool and reasoning parsers, a schema its grammar
backend can compile) is checked when the request is rendered (``serving/chat.py``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, field_validator, model_validator

from api.common import GenerationRequest, PositiveTokens, Strict, Usage

MAX_MESSAGES = 4096
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
MAX_SCHEMA_BYTES = 64 * 1024
"""Largest JSON schema (a tool's parameters, a response format's schema), serialized."""
MAX_SCHEMA_DEPTH = 32
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 1024
MAX_PATTERN_CHARS = 16 * 1024
"""Longest regular expression or grammar of ``structured_outputs``."""
MAX_TEMPLATE_KWARGS_BYTES = 16 * 1024

FunctionName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
ShortText = Annotated[str, StringConstraints(max_length=256)]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]

FinishReason = Literal["stop", "length", "tool_calls", "abort"]


def _depth(value: Any, limit: int) -> int:
    """The nesting depth of a JSON value, counting no further than ``limit`` + 1."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def bounded_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON schema no bigger and no deeper than a grammar backend should be asked to compile."""
    if value is None:
        return value
    if len(json.dumps(value)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB")
    if _depth(value, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    return value


# -- messages ---------------------------------------------------------------------------------------


class CacheBreakpoint(Strict):
    mode: Literal["explicit"]
    ttl: Literal["30m", "12h"] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: CacheBreakpoint | None = None
    """Accepted and ignored (a hint for OpenAI's prompt cache)."""


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: str


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high", "original"] | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class InputAudio(Strict):
    data: str
    format: str = Field(max_length=16)


class AudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class FileData(Strict):
    file_data: str | None = None
    file_id: str | None = Field(default=None, max_length=256)
    filename: str | None = Field(default=None, max_length=256)


class FilePart(Strict):
    type: Literal["file"]
    file: FileData
    prompt_cache_breakpoint: CacheBreakpoint | None = None


ContentPart = Annotated[
    TextPart | RefusalPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")
]
MEDIA_PARTS = ("image_url", "input_audio", "file")


class FunctionCall(Strict):
    """A call the assistant made, as the conversation carries it back."""

    name: str = Field(max_length=256)
    arguments: str


class ToolCall(Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class AudioRef(Strict):
    id: str = Field(max_length=256)


_ASSISTANT_ONLY = (
    "tool_calls",
    "function_call",
    "refusal",
    "audio",
    "annotations",
    "reasoning",
    "reasoning_content",
)


class ChatMessage(Strict):
    """One message of the conversation, in any shape OpenAI's API and vLLM's server take it:
    what the SDK's own answer objects carry can be sent back as they are."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_call_id: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)
    function_call: FunctionCall | None = None
    """Deprecated by OpenAI in favour of ``tool_calls``; accepted back, not shown to the model."""
    refusal: str | None = None
    audio: AudioRef | None = None
    annotations: list[dict[str, Any]] | None = Field(default=None, max_length=1024)
    reasoning: str | None = None
    reasoning_content: str | None = None
    """A reasoning model's earlier reasoning (vLLM's names for it), handed to the chat template."""

    @model_validator(mode="after")
    def _check_role(self) -> ChatMessage:
        if self.role != "assistant":
            extra = [f for f in _ASSISTANT_ONLY if getattr(self, f) is not None]
            if extra:
                raise ValueError(f"'{extra[0]}' is only allowed in assistant messages")
            if self.content is None:
                raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("'tool_call_id' is only allowed in tool messages")
        if self.role == "function" and self.name is None:
            raise ValueError("a function message needs the function's name")
        return self

    def text(self) -> str:
        """The message's text (what its length is judged by before it is rendered)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(
            p.text if isinstance(p, TextPart) else p.refusal if isinstance(p, RefusalPart) else ""
            for p in self.content
        )

    def media(self) -> tuple[int, str] | None:
        """The position and type of the first image, audio or file part, if any."""
        if isinstance(self.content, list):
            for i, part in enumerate(self.content):
                if part.type in MEDIA_PARTS:
                    return i, part.type
        return None

    def for_template(self) -> dict[str, Any]:
        """The message as vLLM's renderer takes it (what never reaches a template is left out)."""
        out = self.model_dump(
            exclude_none=True,
            exclude={"audio", "annotations", "function_call", "refusal"},
        )
        if isinstance(self.content, list):
            out["content"] = [
                {"type": "text", "text": p.text if isinstance(p, TextPart) else p.refusal}  # type: ignore[union-attr]
                for p in self.content
                if isinstance(p, TextPart | RefusalPart)
            ]
        return out


# -- tools and structured output -------------------------------------------------------------------


class FunctionDefinition(Strict):
    name: FunctionName
    description: str | None = Field(default=None, max_length=16 * 1024)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return bounded_schema(value)


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: FunctionName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class LegacyFunctionChoice(Strict):
    name: str = Field(max_length=256)


class JSONSchema(Strict):
    name: FunctionName
    description: str | None = Field(default=None, max_length=16 * 1024)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return bounded_schema(value)


class TextFormat(Strict):
    type: Literal["text"]


class JSONObjectFormat(Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(Strict):
    """vLLM's ``structured_outputs``: exactly one constraint on the text."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, max_length=MAX_PATTERN_CHARS)
    choice: list[Annotated[str, StringConstraints(max_length=1024)]] | None = Field(
        default=None, min_length=1, max_length=MAX_CHOICES
    )
    grammar: str | None = Field(default=None, max_length=MAX_PATTERN_CHARS)
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None
    """Accepted; JSON is always decoded without whitespace between tokens here."""
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = Field(default=None, max_length=256)

    @field_validator("json_")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        if isinstance(value, str):
            if len(value) > MAX_SCHEMA_BYTES:
                raise ValueError(f"the schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB")
            return value
        return bounded_schema(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [self.json_ is not None, self.regex is not None, self.choice is not None]
        given += [self.grammar is not None, bool(self.json_object)]
        if sum(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar or json_object")
        return self


# -- ignored for open-weight models ----------------------------------------------------------------


class AudioOutput(Strict):
    format: str = Field(max_length=16)
    voice: str | dict[str, Any]


class Prediction(Strict):
    type: Literal["content"]
    content: str | list[TextPart]


class PromptCacheOptions(Strict):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: str | None = Field(default=None, max_length=16)


class LegacyFunction(Strict):
    name: str = Field(max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: PositiveTokens | None = None
    max_completion_tokens: PositiveTokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    # vLLM's extensions
    structured_outputs: StructuredOutputs | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=64)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = Field(default=None, max_length=256)
    include_reasoning: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # accepted and ignored (see the module's docstring)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=32)
    verbosity: Literal["low", "medium", "high"] | None = None
    modalities: list[Literal["text", "audio"]] | None = Field(default=None, max_length=2)
    audio: AudioOutput | None = None
    prediction: Prediction | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: str | None = Field(default=None, max_length=1024)
    moderation: dict[str, Any] | None = None
    functions: list[LegacyFunction] | None = Field(default=None, max_length=MAX_TOOLS)
    function_call: Literal["none", "auto"] | LegacyFunctionChoice | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        for key in ("chat_template", "tokenize"):
            if key in value:
                raise ValueError(f"'{key}' cannot be set through chat_template_kwargs")
        if len(json.dumps(value, default=str)) > MAX_TEMPLATE_KWARGS_BYTES:
            raise ValueError(f"chat_template_kwargs is larger than {MAX_TEMPLATE_KWARGS_BYTES // 1024} KiB")
        return value

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message needs add_generation_prompt: false")
        if isinstance(self.tool_choice, NamedToolChoice):
            listed = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in listed:
                raise ValueError(
                    f"tool_choice names '{self.tool_choice.function.name}', which is not in tools"
                )
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def wants_logprobs(self) -> int | None:
        """The alternatives to report per token (0: only the sampled token's), or None."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def for_engine(self) -> dict[str, Any]:
        """The body as vLLM's own request model takes it, for its renderer and its parsers: what
        only this gateway cares about, or what vLLM would refuse, is left out."""
        body = self.model_dump(
            exclude_none=True,
            by_alias=True,
            include={
                "model",
                "tools",
                "tool_choice",
                "parallel_tool_calls",
                "response_format",
                "structured_outputs",
                "chat_template_kwargs",
                "add_generation_prompt",
                "continue_final_message",
                "documents",
                "include_reasoning",
                "reasoning_effort",
                "skip_special_tokens",
                "spaces_between_special_tokens",
                "n",
                "logprobs",
                "top_logprobs",
            },
        )
        body["messages"] = [m.for_template() for m in self.messages]
        if not self.tools:  # [] means none, as no tools at all
            body.pop("tools", None)
            if self.tool_choice in ("auto", "none"):
                body.pop("tool_choice", None)
        return body


# -- the answer -------------------------------------------------------------------------------------


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[ToolCallOut] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    """The reasoning of a model with a reasoning parser (both of vLLM's names for it)."""


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None
