"""Text completions (``POST /v1/completions``): the request body, validated strictly, and the shape
of the answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema, field_validator, model_validator

from api.common import GenerationRequest, PositiveTokens, Usage, only
from shared.messages import FinishReason

# The prompt forms ``single_prompt`` accepts: one text, or one list of token ids, bare or wrapped.
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_ONE_TEXT = Annotated[
    list[str], WithJsonSchema({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1})
]
_TOKEN_ID_LIST = Annotated[list[int], WithJsonSchema(_TOKEN_IDS)]
_ONE_TOKEN_ID_LIST = Annotated[
    list[list[int]], WithJsonSchema({"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1})
]


class CompletionRequest(GenerationRequest):
    prompt: str | _ONE_TEXT | _TOKEN_ID_LIST | _ONE_TOKEN_ID_LIST
    max_tokens: PositiveTokens | None = 16
    echo: bool = Field(default=False, json_schema_extra={"enum": [False]})
    logprobs: int | None = only(0, None)
    suffix: str | None = only("", None)
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


# -- the answer ------------------------------------------------------------------------------------


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
