"""The simulated engine's JSON documents and regex strings, as plain functions: every value drawn is
valid against its schema (checked with ``jsonschema``), and reproducible from its seed."""

from __future__ import annotations

import datetime
import enum
import json
import random
import re
import uuid
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field, conint, constr

from worker.sim_regex import UnsupportedRegex, sample
from worker.sim_schema import compact, document, plain_words

DRAFT_4 = "http://json-schema.org/draft-04/schema#"
WORDS = plain_words([" the", "river", "ing", " Mill", " ", "x"])
SEEDS = range(60)


class Color(enum.StrEnum):
    red = "red"
    blue = "blue"


class Address(BaseModel):
    street: str
    zip: constr(pattern=r"^\d{5}$")  # type: ignore[valid-type]


class Node(BaseModel):
    name: str = Field(max_length=8)
    children: list[Node] = []
    parent: Node | None = None


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: conint(ge=1, le=9)  # type: ignore[valid-type]


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool = True


class Person(BaseModel):
    name: str = Field(min_length=3, max_length=20)
    age: int = Field(ge=0, lt=130)
    score: float = Field(gt=0, le=1)
    color: Color
    tags: list[str] = Field(min_length=1, max_length=3)
    address: Address
    home: Address | None = None
    when: datetime.datetime
    day: datetime.date
    id: uuid.UUID
    pet: Annotated[Cat | Dog, Field(discriminator="kind")]
    tree: Node
    extra: dict[str, int] = {}
    pair: tuple[int, str]


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}


def tool_choice_required(tools: dict[str, Any], parallel: bool = True) -> dict[str, Any]:
    """The schema vLLM 0.32 holds a ``tool_choice: required`` answer to
    (``vllm/tool_parsers/utils.py``, ``_get_json_schema_from_tools``)."""
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [
                {
                    "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
                    "required": ["name", "parameters"],
                }
                for name, params in tools.items()
            ],
        },
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


SCHEMAS: dict[str, Any] = {
    "integer bounds": {"type": "integer", "minimum": -3, "maximum": 4},
    "exclusive bounds": {"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 4},
    "draft 4 exclusive": {
        "$schema": DRAFT_4,
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "exclusiveMaximum": True,
    },
    "a number above": {"type": "number", "minimum": 1e6},
    "multiple of": {"type": "integer", "minimum": 10, "maximum": 100, "multipleOf": 7},
    "boolean or null": {"type": ["boolean", "null"]},
    "string lengths": {"type": "string", "minLength": 30, "maxLength": 32},
    "a short string": {"type": "string", "maxLength": 1},
    "pattern": {"type": "string", "pattern": r"^[A-Z]{2}-\d{3,4}$"},
    "formats": {
        "type": "object",
        "properties": {
            f: {"type": "string", "format": f}
            for f in ("date", "date-time", "time", "email", "uuid", "uri", "ipv4", "ipv6", "hostname")
        },
        "required": ["date", "date-time", "time", "email", "uuid", "uri", "ipv4", "ipv6", "hostname"],
    },
    "enum and const": {
        "type": "object",
        "properties": {"e": {"enum": [1, "two", None, {"x": 3}]}, "c": {"const": [1, 2]}},
        "required": ["e", "c"],
    },
    "arrays": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 3},
        "minItems": 2,
        "maxItems": 4,
        "uniqueItems": True,
    },
    "prefix items": {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "number"}],
        "items": False,
    },
    "draft 4 tuple": {
        "$schema": DRAFT_4,
        "type": "array",
        "items": [{"type": "boolean"}],
        "additionalItems": False,
    },
    "min properties": {"type": "object", "minProperties": 2, "additionalProperties": {"type": "integer"}},
    "closed object": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "boolean"}},
        "minProperties": 2,
        "maxProperties": 2,
        "additionalProperties": False,
    },
    "no type": {"properties": {"n": {"maximum": 3}}, "required": ["n"]},
    "any": {},
    "true": True,
    "one of": {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "array", "maxItems": 0}]},
    "all of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "string"}}, "required": ["b"]},
        ]
    },
    "refs": {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
        "definitions": {"Name": {"type": "string", "minLength": 2}},
        "type": "object",
        "properties": {
            "p": {"$ref": "#/$defs/Point"},
            "n": {"$ref": "#/definitions/Name"},
            "ps": {"type": "array", "items": {"$ref": "#/$defs/Point"}, "minItems": 1},
        },
        "required": ["p", "n", "ps"],
    },
    "recursion through the root": {
        "type": "object",
        "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["next"],
    },
    "tool choice required": tool_choice_required({"get_weather": WEATHER, "noop": {}}),
    "one call only": tool_choice_required({"get_weather": WEATHER}, parallel=False),
    "pydantic: person": Person.model_json_schema(),
    "pydantic: tree": Node.model_json_schema(),
}


@pytest.mark.parametrize("schema", list(SCHEMAS.values()), ids=list(SCHEMAS))
def test_every_document_is_valid_against_its_schema(schema: Any) -> None:
    checker = jsonschema.validators.validator_for(schema).FORMAT_CHECKER
    for seed in SEEDS:
        value = document(schema, random.Random(seed), WORDS)
        jsonschema.validate(json.loads(compact(value)), schema, format_checker=checker)


def test_documents_are_compact() -> None:
    assert compact({"a": [1, {"b": "c d", "é": None}]}) == '{"a":[1,{"b":"c d","é":null}]}'


def test_pydantic_parses_what_it_described() -> None:
    for seed in SEEDS:
        person = Person.model_validate_json(
            compact(document(Person.model_json_schema(), random.Random(seed), WORDS))
        )
        assert person.tree.name and 1 <= len(person.tags) <= 3


def test_documents_are_reproducible_and_vary_with_the_seed() -> None:
    schema = Person.model_json_schema()
    first = [compact(document(schema, random.Random(seed), WORDS)) for seed in range(10)]
    assert first == [compact(document(schema, random.Random(seed), WORDS)) for seed in range(10)]
    assert len(set(first)) == 10


def test_optional_properties_come_and_go() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    shapes = {tuple(document(schema, random.Random(seed), WORDS)) for seed in SEEDS}
    assert shapes == {(), ("a",), ("b",), ("a", "b")}


def test_strings_are_made_of_the_words() -> None:
    text = document({"type": "string"}, random.Random(1), WORDS)
    assert set(text.split(" ")) <= set(WORDS) and WORDS == ("the", "river", "ing", "mill", "x")


def test_what_is_not_honoured_still_gives_a_value() -> None:
    rng = random.Random(0)
    assert document({"$ref": "https://example.com/schema"}, rng, WORDS) == {}
    # A lookahead is outside the regex subset: the string ignores the pattern (documented).
    assert isinstance(document({"type": "string", "pattern": "(?=a)b"}, rng, WORDS), str)


@pytest.mark.parametrize(
    "pattern",
    [
        r"[0-9]{3}-[ab]",
        r"\d+(\.\d{1,2})?",
        r"(foo|bar)+baz?",
        r"[^a-z]{2,4}",
        r"^[A-Z][a-z]*\s\w+$",
        r"(?P<x>a|b)(?:c|d)*",
        r"[\w.-]+@[a-z]+\.com",
        r"x{2,}y{0,1000}",
        r"\u00e9\x41[\]\-]",
        r"yes|no|maybe",
    ],
)
def test_regex_strings_match_in_full(pattern: str) -> None:
    drawn = {sample(pattern, random.Random(seed)) for seed in range(30)}
    assert all(re.fullmatch(pattern, text) for text in drawn)
    assert all(len(text) < 1100 for text in drawn)


@pytest.mark.parametrize("pattern", [r"(?=a)b", r"(a)\1", r"(?i)ab", r"\bword", r"a)", r"[b-a]", r"\p{L}"])
def test_regexes_outside_the_subset_are_refused(pattern: str) -> None:
    with pytest.raises(UnsupportedRegex):
        sample(pattern, random.Random(0))


def test_a_regex_sample_honours_a_length_check() -> None:
    assert len(sample(r"a{1,5}", random.Random(0), fits=lambda text: len(text) == 5)) == 5
    with pytest.raises(UnsupportedRegex):
        sample(r"a{1,5}", random.Random(0), fits=lambda text: len(text) > 5)
