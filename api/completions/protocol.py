"""Text completions (``POST /v1/completions``): the request body, validated strictly, and the shape
of the answer.

A request may hold several prompts (texts, or lists of token ids); each becomes a job of ``n``
choices, and the answer's choices are numbered across them as OpenAI and vLLM number them
(``prompt * n + choice``). ``echo`` puts each prompt's text before its completion, ``logprobs`` asks
for the log probabilities of each token (of the prompt's tokens too, with ``echo``), and
``max_tokens: 0`` with ``echo`` scores a prompt without completing it (what lm-evaluation-harness
sends for log-likelihoods).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

from api.common import MAX_TOKENS_LIMIT, GenerationRequest, Usage, only
from shared.messages import FinishReason

MAX_PROMPTS = 1024
"""Most prompts in one request (vLLM's ``VLLM_MAX_COMPLETION_PROMPTS`` default)."""
MAX_LOGPROBS = 20
"""Largest ``logprobs`` the body may ask for; a model's workers may allow fewer (OpenAI allows 5)."""
DEFAULT_MAX_TOKENS = 16
"""OpenAI's and vLLM's budget when ``max_tokens`` is absent or null."""
NO_FIM = "suffix is only supported for models with FIM completion rendering"

Prompt = str | list[int]
"""One prompt: a text, or its token ids."""
# The forms ``prompt`` takes, and their bounds as the validator below enforces them (stated in the
# schema only: a bound checked per form would report the form that failed last, not the one sent).
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_TEXTS = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS}
_ID_LISTS = {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS}


class CompletionRequest(GenerationRequest):
    prompt: (
        str
        | Annotated[list[str], WithJsonSchema(_TEXTS)]
        | Annotated[list[int], WithJsonSchema(_TOKEN_IDS)]
        | Annotated[list[list[int]], WithJsonSchema(_ID_LISTS)]
    )
    echo: bool = False
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, ge=0, le=MAX_TOKENS_LIMIT)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = only("", None)
    best_of: int | None = None

    @field_validator("max_tokens")
    @classmethod
    def _budget(cls, value: int | None, info: ValidationInfo) -> int:
        if value is None:
            return DEFAULT_MAX_TOKENS
        if value == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens must be at least 1 (0 only with echo, to score the prompt)")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_bounds(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, str):
            return value
        if not value or any(isinstance(p, list) and not p for p in value):
            raise ValueError("a prompt must not be empty")
        if not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts may be sent in one request")
        if any(isinstance(t, int) and t < 0 for p in value for t in (p if isinstance(p, list) else [p])):
            raise ValueError("token ids are not negative")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        # vLLM renders a suffix only for models whose renderer knows fill-in-the-middle; the models
        # served here are rendered with their Hugging Face tokenizer, which has no such rendering.
        if value:
            raise ValueError(NO_FIM)
        return value

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported")
        return self

    def prompts(self) -> list[Prompt]:
        """The request's prompts, in order: each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[int(x) for x in p]]  # type: ignore[arg-type]
        return [x if isinstance(x, str) else [int(t) for t in x] for x in p]  # type: ignore[union-attr]

    @property
    def budget(self) -> int:
        """``max_tokens``, never null once validated."""
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS

    @property
    def echo_only(self) -> bool:
        """Score the prompt, generate nothing: ``echo`` with ``max_tokens: 0``."""
        return self.echo and self.budget == 0


# -- the answer ------------------------------------------------------------------------------------


class TextLogprobs(BaseModel):
    """Log probabilities in OpenAI's legacy shape: per token its text, its log probability (null for
    a prompt's first token, which nothing precedes), the alternatives by text, and where the token
    starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: FinishReason | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
