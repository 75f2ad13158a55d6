"""Chat completions (``POST /v1/chat/completions``): the request body, validated strictly, and the
shape of the answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from api.common import GenerationRequest, PositiveTokens, Strict, Usage, only
from shared.messages import FinishReason

MAX_MESSAGES = 4096


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(Strict):
    type: Literal["text"]


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: PositiveTokens | None = None
    max_completion_tokens: PositiveTokens | None = None
    logprobs: bool | None = only(False, None)
    top_logprobs: int | None = only(0, None)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, json_schema_extra={"maxItems": 0})
    tool_choice: str | dict[str, Any] | None = only("none", None)
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("logprobs", "top_logprobs", "tools")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("this parameter is not supported")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none"):
            raise ValueError("tools are not supported")
        return value

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- the answer ------------------------------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None
