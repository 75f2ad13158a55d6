"""``POST /tokenize`` and ``POST /detokenize``, in the shapes of ``vllm serve``: a prompt, or chat
messages rendered as a chat request renders them, to its token ids; token ids back to text."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from api.chat.protocol import MAX_MESSAGES, MAX_TOOLS, ChatCompletionRequest, ChatMessage, Tool
from api.common import INT64, Strict

_MODEL = Field(default=None, min_length=1, max_length=512)
"""Optional, as in vLLM: without it, the one model served (a 400 when there are several)."""


class TokenizeCompletionRequest(Strict):
    model: str | None = _MODEL
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(Strict):
    """Messages to tokenize as ``POST /v1/chat/completions`` would render them: the same template,
    keywords and tools. ``add_special_tokens`` adds the tokenizer's own (e.g. BOS) on top of the
    template's, off by default as in vLLM."""

    model: str | None = _MODEL
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, max_length=64)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    mm_processor_kwargs: dict[str, Any] | None = Field(default=None, max_length=64)
    """Accepted and ignored: workers serve text-only models."""
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(default=None, max_length=64)
    """Accepted and ignored: workers serve text-only models."""
    _chat: ChatCompletionRequest | None = PrivateAttr(default=None)

    @field_validator("chat_template")
    @classmethod
    def _no_request_template(cls, value: str | None) -> str | None:
        if value is not None:  # vLLM's default too (without --trust-request-chat-template)
            raise ValueError("a chat template sent with the request is not accepted; the model's own is used")
        return value

    @model_validator(mode="after")
    def _as_chat(self) -> TokenizeChatRequest:
        """The chat request these messages would make, checked as that endpoint checks it."""
        body = {
            "model": self.model or "-",
            "messages": self.messages,
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "chat_template_kwargs": self.chat_template_kwargs,
            "tools": self.tools,
        }
        try:
            self._chat = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            raise ValueError(f"{where}: {message}" if where else message) from None
        return self

    def chat(self) -> ChatCompletionRequest:
        assert self._chat is not None  # set by validation
        return self._chat


def _form(body: Any) -> str:
    """Which of the two bodies this is: chat messages, or a prompt (vLLM tells them apart so too)."""
    has = body.__contains__ if isinstance(body, dict) else lambda name: hasattr(body, name)
    return "TokenizeChatRequest" if has("messages") else "TokenizeCompletionRequest"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")]
    | Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")],
    Discriminator(_form),
]


class DetokenizeRequest(Strict):
    model: str | None = _MODEL
    tokens: list[int] = Field(json_schema_extra={"items": {"type": "integer", "minimum": 0}})

    @field_validator("tokens")
    @classmethod
    def _token_ids(cls, value: list[int]) -> list[int]:
        if any(not 0 <= t < INT64 for t in value):
            raise ValueError("token ids are non-negative 64-bit integers")
        return value


# -- the answers ------------------------------------------------------------------------------------


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(BaseModel):
    prompt: str
