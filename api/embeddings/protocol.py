"""Embeddings (``POST /v1/embeddings``): the request body, validated strictly, and the shape of the
answer.

Every field of the openai SDK's ``embeddings.create`` is honoured: ``input`` as one text, a list of
texts, one list of token ids or a list of them (at most 2,048 inputs, as OpenAI allows), the
``encoding_format`` (``float``, or ``base64`` of little-endian float32, which the SDK asks for by
default), ``dimensions`` (for a Matryoshka model: checked against the model when the request is
prepared, ``serving/embeddings.py``) and ``user`` (accepted, not used). Unknown fields are refused,
as OpenAI refuses them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, WithJsonSchema, field_validator

from api.common import INT32_MAX, Strict

MAX_INPUTS = 2048
"""Inputs in one request, as OpenAI bounds them."""
MAX_DIMENSIONS = 1_000_000

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
_TOKEN_IDS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
    "minItems": 1,
}


def _form(value: Any) -> str:
    """Which form of ``input`` a value has, judged by its first item: only that form is validated,
    so an error names the item that breaks it (a union would report every form's failure). The
    names are the forms' types, which the gateway's error paths leave out."""
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, str):
            return "list[str]"
        return "list[list[int]]" if isinstance(first, list) else "list[int]"
    return "list[str]" if isinstance(value, list) else "str"


Input = Annotated[
    Annotated[str, Tag("str"), WithJsonSchema({"type": "string", "minLength": 1})]
    | Annotated[
        list[Annotated[str, Field(min_length=1)]],
        Tag("list[str]"),
        Field(min_length=1, max_length=MAX_INPUTS),
        WithJsonSchema(
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "maxItems": MAX_INPUTS,
            }
        ),
    ]
    | Annotated[TokenIds, Tag("list[int]"), WithJsonSchema(_TOKEN_IDS)]
    | Annotated[
        list[TokenIds],
        Tag("list[list[int]]"),
        Field(min_length=1, max_length=MAX_INPUTS),
        WithJsonSchema({"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_INPUTS}),
    ],
    Discriminator(_form),
]

EncodingFormat = Literal["float", "base64"]


class EmbeddingRequest(Strict):
    model: str = Field(min_length=1, max_length=512)
    input: Input
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(default=None, ge=1, le=MAX_DIMENSIONS)
    user: str | None = Field(default=None, max_length=512)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        # Checked here, not by a constrained type, whose name would stand in the error's path.
        if value == "":
            raise ValueError("the input must not be an empty string")
        return value

    def inputs(self) -> list[str | list[int]]:
        """The request's inputs, each a text or a list of token ids."""
        given = self.input
        if isinstance(given, str):
            return [given]
        if all(isinstance(x, int) for x in given):
            return [[int(x) for x in given]]  # type: ignore[arg-type]
        return list(given)  # type: ignore[arg-type]

    def listed(self) -> bool:
        """Whether ``input`` is a list of inputs (so an input's parameter is ``input.<index>``)."""
        given = self.input
        return isinstance(given, list) and not all(isinstance(x, int) for x in given)


# -- the answer ------------------------------------------------------------------------------------


class EmbeddingObject(BaseModel):
    index: int
    object: Literal["embedding"]
    embedding: list[float] | str
    """The vector's values, or with ``encoding_format: base64`` their little-endian float32 bytes."""


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[EmbeddingObject]
    usage: EmbeddingUsage
