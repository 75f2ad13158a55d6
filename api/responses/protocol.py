"""The Responses API (``POST /v1/responses`` and the stored responses it makes): the request body,
validated strictly, and the shapes of its answers.

The subset ``vllm serve`` answers: text and message input, ``instructions``, function tools and
their calls' outputs (``function_call`` / ``function_call_output`` items), reasoning items sent
back, ``tool_choice``, ``text.format``, ``reasoning.effort``, the sampling fields, streaming,
stored responses (``previous_response_id``, ``store``) and ``background``. Every other field of the
openai SDK's ``responses.create`` parameters is accepted and ignored where it means nothing for an
open-weight model served here (``docs/api.md`` lists which), or refused with a 400 naming it where
ignoring it would answer another question than the one asked (a stored ``prompt`` template, a
``conversation``, built-in tools, image and file inputs). So is every item the SDK's own answers
carry, so that a response's output can be sent back as the next turn's input as it is.

Its items, in and out, are in ``api/responses/items.py``. A request becomes a chat job
(``serving/responses.py`` renders its input as chat messages with vLLM's own functions); only the
answer is assembled differently (``api/responses/assembly.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, Tag, ValidationInfo, field_validator

from api.chat.protocol import (
    MAX_TOP_LOGPROBS,
    FunctionName,
    JSONObjectFormat,
    ReasoningEffort,
    StructuredOutputs,
    TextFormat,
    bounded_schema,
)
from api.common import INT32_MAX, INT64, MAX_LOGIT_BIAS, MAX_STOP_SEQUENCES, PositiveTokens, Strict
from api.responses.items import Id, InputItem, OutputItem, ReasoningItem, by_type, media

MAX_ITEMS = 4096
"""Most input items (messages, calls, call outputs, reasoning) in one request."""
MAX_TOOLS = 128
MAX_METADATA = 16

ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
FINISHED = ("completed", "incomplete", "failed", "cancelled")

# -- tools, formats, reasoning ------------------------------------------------------------------


class FunctionTool(Strict):
    type: Literal["function"]
    name: FunctionName
    description: str | None = Field(default=None, max_length=16 * 1024)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None
    """Accepted and ignored, with ``allowed_callers`` and ``output_schema``."""
    allowed_callers: list[Literal["direct", "programmatic"]] | None = Field(default=None, max_length=2)
    output_schema: dict[str, Any] | None = None

    @field_validator("parameters", "output_schema")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return bounded_schema(value)


class FunctionChoice(Strict):
    type: Literal["function"]
    name: FunctionName


class FormatJSONSchema(Strict):
    type: Literal["json_schema"]
    name: FunctionName
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = Field(default=None, max_length=16 * 1024)
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any] | None:
        return bounded_schema(value)


Format = Annotated[
    Annotated[TextFormat, Tag("TextFormat")]
    | Annotated[JSONObjectFormat, Tag("JSONObjectFormat")]
    | Annotated[FormatJSONSchema, Tag("FormatJSONSchema")],
    by_type(text="TextFormat", json_object="JSONObjectFormat", json_schema="FormatJSONSchema"),
]


class TextConfig(Strict):
    format: Format | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    """Accepted and ignored."""


Summary = Literal["auto", "concise", "detailed"]


class Reasoning(Strict):
    effort: ReasoningEffort | None = None
    summary: Summary | None = None
    """Accepted and ignored, with ``generate_summary``, ``context`` and ``mode``: reasoning comes
    back whole, as reasoning text, not summarised."""
    generate_summary: Summary | None = None
    context: Literal["auto", "current_turn", "all_turns"] | None = None
    mode: str | None = Field(default=None, max_length=32)


Includable = Literal[
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
]
LOGPROBS = "message.output_text.logprobs"

# -- accepted and ignored -----------------------------------------------------------------------


class ResponseStreamOptions(Strict):
    include_obfuscation: bool | None = None


class CacheOptions(Strict):
    comparison_response_id: Id | None = None
    mode: Literal["implicit", "explicit"] | None = None
    prewarm: bool | None = None
    ttl: Literal["30m", "12h"] | None = None


class BackgroundOptions(Strict):
    completion_window: Literal["soonest", "2h", "8h"] | None = None
    continuation_id: Id | None = None


class ContextManagement(Strict):
    type: str = Field(max_length=64)
    compact_threshold: int | None = Field(default=None, ge=0, le=INT32_MAX)


class AccessPrograms(Strict):
    cyber: Literal["standard", "daybreak_blue", "daybreak_red"] | None = None


class ImageOptions(Strict):
    context_compression: Literal["auto", "enabled", "disabled"] | None = None


class ModerationMode(Strict):
    mode: Literal["score", "block"]


class ModerationPolicy(Strict):
    input: ModerationMode | None = None
    output: ModerationMode | None = None


class Moderation(Strict):
    model: str = Field(max_length=256)
    policy: ModerationPolicy | None = None


# -- refused when set ---------------------------------------------------------------------------


class PromptTemplate(Strict):
    """A prompt stored at OpenAI: there is none here (a 400 when set)."""

    id: Id
    variables: dict[str, Any] | None = None
    version: Id | None = None


class ConversationRef(Strict):
    id: Id


# -- the request --------------------------------------------------------------------------------


class ResponsesRequest(Strict):
    model: str = Field(min_length=1, max_length=512)
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_ITEMS)]
    instructions: str | None = None
    previous_response_id: Id | None = None
    store: bool | None = True
    background: bool | None = False
    stream: bool | None = False
    stream_options: ResponseStreamOptions | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: PositiveTokens | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    include: list[Includable] | None = Field(default=None, max_length=16)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = (
        Field(default=None, max_length=MAX_METADATA)
    )
    """Kept with the response and answered back."""
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = Field(default=None, max_length=512)
    # accepted and ignored
    max_tool_calls: int | None = Field(default=None, ge=0, le=INT32_MAX)
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast", "ultrafast"] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: CacheOptions | None = None
    safety_identifier: str | None = Field(default=None, max_length=1024)
    background_options: BackgroundOptions | None = None
    context_management: list[ContextManagement] | None = Field(default=None, max_length=16)
    access_programs: AccessPrograms | None = None
    image: ImageOptions | None = None
    moderation: Moderation | None = None
    # refused when set
    prompt: PromptTemplate | None = None
    conversation: Id | ConversationRef | None = None
    # vLLM's extensions
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-INT64, le=INT64 - 1)
    stop: str | list[str] | None = Field(
        default=None,
        json_schema_extra={"minLength": 1, "maxItems": MAX_STOP_SEQUENCES, "items": {"minLength": 1}},
    )
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] | None = Field(
        default=None, max_length=64
    )
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = Field(
        default=None,
        json_schema_extra={"maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": "^[0-9]+$"}},
    )
    include_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=64)
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stream_options")
    @classmethod
    def _streamed(
        cls, value: ResponseStreamOptions | None, info: ValidationInfo
    ) -> ResponseStreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _listed(cls, value: Any, info: ValidationInfo) -> Any:
        """Checked against ``tools``, declared before it (so the error names ``tool_choice``)."""
        tools = info.data.get("tools") or ()
        if isinstance(value, FunctionChoice) and value.name not in {t.name for t in tools}:
            raise ValueError(f"tool_choice names '{value.name}', which is not in tools")
        if value == "required" and not tools:
            raise ValueError("tool_choice 'required' needs tools")
        return value

    @property
    def storing(self) -> bool:
        return self.store is not False

    def wants_logprobs(self) -> int | None:
        """Alternatives per token to report, when the output text's log probabilities are asked
        for (``include``), else None."""
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or ()) else None

    def refused(self) -> tuple[str, str] | None:
        """A field set that cannot be honoured here, and why: (param, message)."""
        if self.prompt is not None:
            return "prompt", "stored prompt templates are not served here; send the prompt as input"
        if self.conversation is not None:
            return "conversation", "conversations are not served here; continue with previous_response_id"
        if self.background and not self.storing:
            return "background", "a background response must be stored: background needs store: true"
        if self.background and self.stream:
            return "background", "a background response is not streamed: poll GET /v1/responses/{id}"
        if isinstance(self.input, list):
            for i, item in enumerate(self.input):
                found = media(item)
                if found is not None:
                    part, kind = found
                    return (
                        f"input.{i}.{part}",
                        f"'{kind}' inputs need a model that takes them; this model takes text only",
                    )
                if isinstance(item, ReasoningItem) and item.encrypted_content is not None:
                    return f"input.{i}.encrypted_content", "encrypted reasoning is not served here"
        return None


# -- the answer ---------------------------------------------------------------------------------


class ResponseInputDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int


class ResponseOutputDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: ResponseInputDetails
    output_tokens: int
    output_tokens_details: ResponseOutputDetails
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseIncomplete(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseTool(BaseModel):
    type: Literal["function"]
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool | None


class ResponseTextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseText(BaseModel):
    format: ResponseTextFormat
    verbosity: str | None = None


class ResponseReasoning(BaseModel):
    effort: str | None
    summary: str | None


class Response(BaseModel):
    """A response object: what ``POST /v1/responses`` answers (or streams as its events' payload),
    and what ``GET``, ``cancel`` and the next turn's ``previous_response_id`` read."""

    id: str
    object: Literal["response"]
    created_at: int
    completed_at: int | None
    status: ResponseStatus
    background: bool
    error: ResponseError | None
    incomplete_details: ResponseIncomplete | None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: int | None
    metadata: dict[str, str] | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    prompt_cache_key: str | None
    reasoning: ResponseReasoning
    safety_identifier: str | None
    service_tier: str
    store: bool
    temperature: float
    text: ResponseText
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice
    tools: list[ResponseTool]
    top_logprobs: int | None
    top_p: float
    truncation: Literal["auto", "disabled"]
    usage: ResponseUsage | None
    user: str | None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]
