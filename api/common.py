"""What chat and text completions share: the strict base of every request body, the sampling fields
both accept and their conversion to the wire's sampling, and the usage shape both answer with.

Besides OpenAI's own fields, a few of vLLM's sampling extensions are accepted (``ignore_eos``,
``min_tokens``, ``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids``) so that clients
written for ``vllm serve`` keep working; the openai SDK sends them through ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import JsonDict

from shared.messages import Sampling
from shared.messages import Usage as WireUsage

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512
"""The engine compares every stop string with the end of the text after each step: a bound on their
length bounds what one request can make a worker do per token."""
MAX_TOKENS_LIMIT = 1_000_000
INT32_MAX = 2**31 - 1
INT64 = 2**63
"""vLLM's bounds: a seed must fit a signed 64-bit integer; top_k beyond the vocabulary means no limit,
but the engine holds it in 32 bits."""


class Strict(BaseModel):
    """A request body (or part of one): unknown fields are refused, as OpenAI refuses them."""

    model_config = ConfigDict(extra="forbid")


def only(*values: Any) -> Any:
    """Document the only values a validator lets through (the OpenAPI schema shows the type)."""
    return Field(default=None, json_schema_extra={"enum": list(values)})


# What the ``stop`` validator enforces, stated for strings and lists alike (each keyword applies to
# one JSON type only).
_STOP_SCHEMA: JsonDict = {
    "minLength": 1,
    "maxLength": MAX_STOP_CHARS,
    "maxItems": MAX_STOP_SEQUENCES,
    "items": {"minLength": 1, "maxLength": MAX_STOP_CHARS},
}


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    include_obfuscation: bool | None = None
    """Accepted and ignored: OpenAI pads chunks against side channels; nothing here needs it."""
    resumable: bool = False
    """Ids on every event, so a client whose connection drops can send the request again with
    ``Last-Event-ID`` and get the rest of the answer (see ``serving/resume.py``)."""


PositiveTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
MAX_LOGIT_BIAS = 1024
_DECIDED = frozenset({"max_tokens", "logprobs", "logit_bias", "structured_output"})
"""Wire sampling fields not copied by name: their request fields differ in form, or the request
path decides them."""


class GenerationRequest(Strict):
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
    logit_bias: dict[str, float] | None = Field(
        default=None,
        json_schema_extra={"maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": "^[0-9]+$"}},
    )
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
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if not value:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} token ids may be biased")
        for token, bias in value.items():
            if not (token.isascii() and token.isdigit()) or int(token) > INT32_MAX:
                raise ValueError(f"'{token}' is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} must lie between -100 and 100")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _check_common(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling(self, max_tokens: int, **decided: Any) -> Sampling:
        """The wire's sampling parameters: each field of :class:`~shared.messages.Sampling` from the
        field of the same name here (unset, or absent from this kind of request: the wire's
        default), so a new parameter is added in two places, here and there; ``test_validation``
        checks they stay in step. ``decided`` gives what the request path works out itself (the
        structured output, log probabilities, special tokens a tool parser needs)."""
        given = {
            name: value
            for name in Sampling.model_fields
            if name not in _DECIDED and (value := getattr(self, name, None)) is not None
        }
        given["stop"] = tuple(self.stop_list())
        given["stop_token_ids"] = tuple(self.stop_token_ids or ())
        given["logit_bias"] = tuple((int(t), b) for t, b in (self.logit_bias or {}).items())
        if self.top_k == -1:  # vLLM's other spelling of "no limit"
            given.pop("top_k")
        return Sampling(max_tokens=max_tokens, **(given | decided))

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """Usage on every chunk: vLLM's ``continuous_usage_stats``, honoured with ``include_usage``."""
        return self.include_usage() and bool(
            self.stream_options and self.stream_options.continuous_usage_stats
        )


class Usage(BaseModel):
    """The ``usage`` of an answer (the OpenAPI document's shape)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage_dict(usage: WireUsage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
