"""OpenAI request bodies the gateway accepts, validated strictly (unknown fields are rejected).

Besides OpenAI's own fields, a few of vLLM's sampling extensions are accepted (``ignore_eos``,
``min_tokens``, ``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids``) so that clients
written for ``vllm serve`` keep working; the openai SDK sends them through ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.json_schema import JsonDict

from shared.messages import Sampling

MAX_STOP_SEQUENCES = 16
MAX_MESSAGES = 4096
MAX_TOKENS_LIMIT = 1_000_000
INT32_MAX = 2**31 - 1
INT64 = 2**63
"""vLLM's bounds: a seed must fit a signed 64-bit integer; top_k beyond the vocabulary means no limit,
but the engine holds it in 32 bits."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _only(*values: Any) -> Any:
    """Document the only values a validator below lets through (the OpenAPI schema shows the type)."""
    return Field(default=None, json_schema_extra={"enum": list(values)})


# What the ``stop`` validator enforces, stated for strings and lists alike (each keyword applies to
# one JSON type only).
_STOP_SCHEMA: JsonDict = {"minLength": 1, "maxItems": MAX_STOP_SEQUENCES, "items": {"minLength": 1}}
# The prompt forms ``single_prompt`` accepts: one text, or one list of token ids, bare or wrapped.
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_ONE_TEXT = Annotated[
    list[str], WithJsonSchema({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1})
]
_TOKEN_ID_LIST = Annotated[list[int], WithJsonSchema(_TOKEN_IDS)]
_ONE_TOKEN_ID_LIST = Annotated[
    list[list[int]], WithJsonSchema({"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1})
]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
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


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


PositiveTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1, max_length=512)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = Field(default=None, json_schema_extra=_STOP_SCHEMA)
    seed: int | None = Field(default=None, ge=-INT64, le=INT64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra={"maxProperties": 0})
    user: str | None = Field(default=None, max_length=512)
    # vLLM-compatible extensions
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_LIMIT)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] | None = Field(
        default=None, max_length=64
    )
    include_stop_str_in_output: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _check_common(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling(self, max_tokens: int) -> Sampling:
        """The wire's sampling parameters: each field of :class:`~shared.messages.Sampling` from the
        field of the same name here (unset: the wire's default), so a new parameter is added in two
        places, here and there; ``test_validation`` checks they stay in step."""
        given = {
            name: value
            for name in Sampling.model_fields
            if name != "max_tokens" and (value := getattr(self, name)) is not None
        }
        given["stop"] = tuple(self.stop_list())
        given["stop_token_ids"] = tuple(self.stop_token_ids or ())
        if self.top_k == -1:  # vLLM's other spelling of "no limit"
            given.pop("top_k")
        return Sampling(max_tokens=max_tokens, **given)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """Usage on every chunk: vLLM's ``continuous_usage_stats``, honoured with ``include_usage``."""
        return self.include_usage() and bool(
            self.stream_options and self.stream_options.continuous_usage_stats
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: PositiveTokens | None = None
    max_completion_tokens: PositiveTokens | None = None
    logprobs: bool | None = _only(False, None)
    top_logprobs: int | None = _only(0, None)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, json_schema_extra={"maxItems": 0})
    tool_choice: str | dict[str, Any] | None = _only("none", None)
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


class CompletionRequest(_Sampling):
    prompt: str | _ONE_TEXT | _TOKEN_ID_LIST | _ONE_TOKEN_ID_LIST
    max_tokens: PositiveTokens | None = 16
    echo: bool = Field(default=False, json_schema_extra={"enum": [False]})
    logprobs: int | None = _only(0, None)
    suffix: str | None = _only("", None)
    best_of: int | None = None

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("this parameter is not supported")
        return value

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported")
        self.single_prompt()
        return self

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request; batches of several prompts are refused."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [int(x) for x in p]  # type: ignore[arg-type]
        if len(p) == 1:
            only = p[0]
            return only if isinstance(only, str) else [int(x) for x in only]  # type: ignore[union-attr]
        raise ValueError("a request takes one prompt; send several prompts as several requests")


# -- the Batch API ---------------------------------------------------------------------------------

MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class OutputExpiresAfter(_Strict):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2_592_000)


class BatchCreateRequest(_Strict):
    """``POST /v1/batches``: run the requests of an uploaded file, within the completion window."""

    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"]
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)
    output_expires_after: OutputExpiresAfter | None = None
