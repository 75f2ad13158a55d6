"""The items a response's input and output are made of: content parts, messages, function calls
and their outputs, reasoning. Input items are taken in every shape the openai SDK's own output
items have, so a response's output can be sent back as the next turn's input as it is."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag

from api.chat.protocol import CacheBreakpoint, TokenLogprob
from api.common import Strict

MAX_PARTS = 1024
"""Most content parts in one message or call output."""
MAX_ID = 256
"""Longest id, call id, name or namespace an item may carry."""

Status = Literal["in_progress", "completed", "incomplete"]
Id = Annotated[str, Field(max_length=MAX_ID)]

# -- input content ------------------------------------------------------------------------------


class InputText(Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: CacheBreakpoint | None = None
    """Accepted and ignored (a hint for OpenAI's prompt cache)."""


class InputImage(Strict):
    """Refused when sent (workers serve text-only models); declared so the 400 can name it."""

    type: Literal["input_image"]
    detail: Literal["low", "high", "auto", "original"] | None = None
    file_id: Id | None = None
    image_url: str | None = None
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class InputFile(Strict):
    """Refused when sent, as images are."""

    type: Literal["input_file"]
    detail: Literal["low", "high", "auto"] | None = None
    file_data: str | None = None
    file_id: Id | None = None
    file_url: str | None = None
    filename: Id | None = None
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class OutputText(Strict):
    """Text of an assistant message, as the SDK's own answer carries it back."""

    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] | None = Field(default=None, max_length=1024)
    logprobs: list[dict[str, Any]] | None = None


class Refusal(Strict):
    type: Literal["refusal"]
    refusal: str


def by_type(**tags: str) -> Discriminator:
    """Tell a union's members apart by ``type``, each tagged by its class name: capitalised, so an
    error's location names the field (``input.0.content.1.text``) without the member's name."""

    def tag(value: Any) -> str | None:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return tags.get(kind) if isinstance(kind, str) else None

    return Discriminator(
        tag,
        custom_error_type="invalid_type",
        custom_error_message=f"'type' must be one of {', '.join(tags)}",
    )


MessagePart = Annotated[
    Annotated[InputText, Tag("InputText")]
    | Annotated[InputImage, Tag("InputImage")]
    | Annotated[InputFile, Tag("InputFile")]
    | Annotated[OutputText, Tag("OutputText")]
    | Annotated[Refusal, Tag("Refusal")],
    by_type(
        input_text="InputText",
        input_image="InputImage",
        input_file="InputFile",
        output_text="OutputText",
        refusal="Refusal",
    ),
]
OutputPart = Annotated[
    Annotated[InputText, Tag("InputText")]
    | Annotated[InputImage, Tag("InputImage")]
    | Annotated[InputFile, Tag("InputFile")],
    by_type(input_text="InputText", input_image="InputImage", input_file="InputFile"),
]
MEDIA = ("input_image", "input_file")

# -- input items -------------------------------------------------------------------------------


class MessageItem(Strict):
    """A message: the user's, an instruction (``system``, ``developer``), or an assistant's earlier
    answer (the SDK's output message sent back as it is)."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[MessagePart], Field(max_length=MAX_PARTS)]
    id: Id | None = None
    status: Status | None = None
    """``in_progress`` or ``incomplete`` on the last item: the model continues that message."""
    phase: Literal["commentary", "final_answer"] | None = None
    """Accepted and ignored."""


class Caller(Strict):
    type: Literal["direct", "program"]
    caller_id: Id | None = None


class FunctionCallItem(Strict):
    """A call the model made, sent back before its output."""

    type: Literal["function_call"]
    call_id: Id
    name: Id
    arguments: str
    id: Id | None = None
    status: Status | None = None
    namespace: Id | None = None
    caller: Caller | None = None
    async_: bool | None = Field(default=None, alias="async")


class FunctionCallOutputItem(Strict):
    """What a function returned, for the call ``call_id``."""

    type: Literal["function_call_output"]
    call_id: Id
    output: str | Annotated[list[OutputPart], Field(max_length=MAX_PARTS)]
    id: Id | None = None
    status: Status | None = None
    caller: Caller | None = None
    name: Id | None = None
    namespace: Id | None = None


class SummaryText(Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(Strict):
    """A reasoning model's earlier reasoning, sent back (its text reaches the chat template)."""

    type: Literal["reasoning"]
    id: Id | None = None
    summary: list[SummaryText] = Field(default_factory=list, max_length=MAX_PARTS)
    content: list[ReasoningText] | None = Field(default=None, max_length=MAX_PARTS)
    encrypted_content: str | None = None
    """Refused when set: no reasoning here is ever encrypted."""
    status: Status | None = None


_KINDS = {
    "message": "Message",
    "function_call": "FunctionCall",
    "function_call_output": "FunctionCallOutput",
    "reasoning": "Reasoning",
}


def _kind(item: Any) -> str | None:
    """The tag of an input item (capitalised, so an error's location names the item by its index
    alone); an item without ``type`` is a message, as OpenAI reads it."""
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")
    return _KINDS.get(kind or "message")


InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")]
    | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")]
    | Annotated[ReasoningItem, Tag("Reasoning")],
    Discriminator(
        _kind,
        custom_error_type="unsupported_item",
        custom_error_message=(
            "items of this type are not served here: send messages, function_call, "
            "function_call_output and reasoning items"
        ),
    ),
]


def media(item: Any) -> tuple[str, str] | None:
    """Where the item's first image or file part is (``content.3``), and its type."""
    parts = item.content if isinstance(item, MessageItem) else getattr(item, "output", None)
    field = "content" if isinstance(item, MessageItem) else "output"
    if isinstance(parts, list):
        for j, part in enumerate(parts):
            if part.type in MEDIA:
                return f"{field}.{j}", part.type
    return None


# -- output items ------------------------------------------------------------------------------


class OutputTextPart(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]]
    logprobs: list[TokenLogprob] | None = None


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    role: Literal["assistant"]
    status: Status
    content: list[OutputTextPart]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Status


class OutputReasoning(BaseModel):
    type: Literal["reasoning"]
    id: str
    summary: list[SummaryText]
    content: list[ReasoningText]
    status: Status


OutputItem = Annotated[OutputMessage | OutputFunctionCall | OutputReasoning, Field(discriminator="type")]
