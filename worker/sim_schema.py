"""Pure: a JSON value valid against a JSON schema, drawn from a seeded random generator, for the
simulated engine's structured outputs and tool calls.

What it honours: ``type`` (one or a list, ``null`` among them; OpenAPI's ``nullable``), ``enum``
and ``const``; objects with every ``required`` property, about half the optional ones, and
``minProperties``/``maxProperties``; strings of words within ``minLength``/``maxLength``, a
``pattern`` in :mod:`worker.sim_regex`'s subset, and the common ``format`` values (date, date-time,
time, email, uuid, uri, ipv4, ipv6, hostname); integers and numbers within ``minimum``/``maximum``
(exclusive bounds too, draft 4's and later ones), on an integer ``multipleOf``; booleans; arrays
within ``minItems``/``maxItems`` with ``items``, ``prefixItems`` (or draft 4's item lists) and
``uniqueItems``; ``anyOf`` and ``oneOf`` (one branch, drawn; ``oneOf`` is taken as ``anyOf``, as
the engine's grammar takes it), ``allOf`` (merged), and ``$ref`` to any ``#/...`` pointer in the
document (``$defs``, ``definitions``, ``#`` itself). Past a few levels of recursion it generates
only what is required.

What it does not: a ``pattern`` outside that subset gives the string it would give without one (it
may not match); ``not``, ``if``/``then``/``else``, ``patternProperties``, ``contains``,
``dependentRequired`` and a fractional ``multipleOf`` are ignored; a ``$ref`` outside the document
gives ``{}``. The engine's grammar would hold a real model to them; this is a measuring tool.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from worker.sim_regex import UnsupportedRegex, sample

MAX_DEPTH = 6
"""Nesting past which objects hold only their required properties and arrays their fewest items."""
GIVE_UP_DEPTH = 4 * MAX_DEPTH
"""Nesting at which a schema that only ever recurses (a required property of its own type) gets
``{}``."""
MAX_STEPS = 32
"""``$ref``, ``allOf`` and ``anyOf`` steps followed at one level before giving up on a schema."""
EXTRA_ITEMS = 3
"""Most array items past ``minItems`` when ``maxItems`` allows more."""
WORDS_PER_STRING = (1, 6)
_TYPE_OF_KEYWORD = (
    ({"properties", "required", "additionalProperties", "minProperties", "maxProperties"}, "object"),
    ({"items", "prefixItems", "minItems", "maxItems", "uniqueItems"}, "array"),
    ({"minLength", "maxLength", "pattern", "format"}, "string"),
    ({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}, "number"),
)
_MERGED = ("properties", "$defs", "definitions")


def compact(value: Any) -> str:
    """JSON with no whitespace between tokens, as the engine decodes it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class SchemaValues:
    """Values for the schemas of one document (``root`` resolves its ``$ref``s)."""

    def __init__(self, root: Any, rng: random.Random, words: Sequence[str]) -> None:
        self._root = root
        self._rng = rng
        self._words = words or ("word",)

    def document(self) -> Any:
        return self.value(self._root, 0)

    def value(self, schema: Any, depth: int) -> Any:
        """A value ``schema`` accepts (a best effort where it asks for more than is honoured)."""
        if schema is True or schema == {}:
            return self.words(WORDS_PER_STRING)
        if not isinstance(schema, Mapping) or depth > GIVE_UP_DEPTH:
            return {}
        schema = self._resolved(schema, depth)
        if "const" in schema:
            return schema["const"]
        if isinstance(enum := schema.get("enum"), list) and enum:
            return self._rng.choice(enum)
        kind = self._kind(schema)
        if kind == "null":
            return None
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, depth)
        if kind == "string":
            return self.string(schema)
        if kind in ("integer", "number"):
            return self.number(schema, integer=kind == "integer")
        if kind == "boolean":
            return self._rng.random() < 0.5
        return self.words(WORDS_PER_STRING)

    def _resolved(self, schema: Mapping[str, Any], depth: int) -> Mapping[str, Any]:
        """``schema`` with its ``$ref``, ``allOf`` and a drawn ``anyOf``/``oneOf`` branch merged in."""
        for _ in range(MAX_STEPS):
            rest = dict(schema)
            if isinstance(ref := rest.pop("$ref", None), str):
                target = self._pointer(ref)
                schema = _merge(target if isinstance(target, Mapping) else {"type": "object"}, rest)
                continue
            if isinstance(parts := rest.pop("allOf", None), list):
                for part in parts:
                    rest = _merge(rest, part) if isinstance(part, Mapping) else rest
                schema = rest
                continue
            branches = rest.pop("anyOf", None) or rest.pop("oneOf", None)
            if not isinstance(branches, list):
                return schema
            usable = [b for b in branches if isinstance(b, Mapping) or b is True]
            if depth >= MAX_DEPTH:  # deep down, a branch that does not nest further, if there is one
                usable = [b for b in usable if _flat(b)] or usable
            if usable:
                branch = self._rng.choice(usable)
                rest = _merge(rest, branch if isinstance(branch, Mapping) else {})
            schema = rest
        return {}

    def _pointer(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        node = self._root
        for part in ref[1:].lstrip("/").split("/") if ref not in ("#", "#/") else ():
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return None
        return node

    def _kind(self, schema: Mapping[str, Any]) -> str | None:
        kind = schema.get("type")
        if isinstance(kind, list):
            concrete = [k for k in kind if isinstance(k, str) and k != "null"]
            # Mostly a value, sometimes null: a nullable field is usually filled.
            if "null" in kind and (not concrete or self._rng.random() < 0.2):
                return "null"
            kind = self._rng.choice(concrete) if concrete else None
        if schema.get("nullable") is True and self._rng.random() < 0.2:
            return "null"
        if isinstance(kind, str):
            return kind
        keys = set(schema)
        return next((name for words, name in _TYPE_OF_KEYWORD if keys & words), None)

    def object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        required = [r for r in schema.get("required", ()) if isinstance(r, str)]
        most = schema.get("maxProperties")
        least = schema.get("minProperties", 0)
        optional = [name for name in properties if name not in required]
        chosen = set(required)
        if depth < MAX_DEPTH:
            chosen |= {name for name in optional if self._rng.random() < 0.5}
        for name in optional:  # minProperties: optional ones first, in order
            if len(chosen) >= least:
                break
            chosen.add(name)
        if isinstance(most, int):
            extra = [name for name in optional if name in chosen][: max(0, len(chosen) - most)]
            chosen -= set(extra)
        out: dict[str, Any] = {}
        for name in [*properties, *(r for r in required if r not in properties)]:
            if name in chosen and name not in out:
                out[name] = self.value(properties.get(name, self._additional(schema)), depth + 1)
        additional = self._additional(schema)
        while len(out) < least and additional is not False:
            out[f"{self.words((1, 1))}{len(out)}"] = self.value(additional, depth + 1)
        return out

    @staticmethod
    def _additional(schema: Mapping[str, Any]) -> Any:
        extra = schema.get("additionalProperties", True)
        return extra if isinstance(extra, Mapping | bool) else True

    def array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        items = schema.get("items", True)
        prefix = schema.get("prefixItems")
        if isinstance(items, list):  # draft 4's tuple form
            prefix, items = items, schema.get("additionalItems", True)
        prefix = prefix if isinstance(prefix, list) else []
        least = schema.get("minItems", 0)
        most = schema.get("maxItems")
        if items is False:
            most = len(prefix) if most is None else min(most, len(prefix))
        top = least + EXTRA_ITEMS if most is None else max(least, min(most, least + EXTRA_ITEMS))
        count = least if depth >= MAX_DEPTH else self._rng.randint(least, top)
        out: list[Any] = []
        seen: set[str] = set()
        unique = schema.get("uniqueItems") is True
        for _ in range(8 * count + 8):  # unique items: draws that repeat one are dropped
            if len(out) >= count:
                break
            item = self.value(prefix[len(out)] if len(out) < len(prefix) else items, depth + 1)
            if unique:
                key = json.dumps(item, sort_keys=True)
                if key in seen:
                    continue
                seen.add(key)
            out.append(item)
        return out

    def string(self, schema: Mapping[str, Any]) -> str:
        least = max(0, int(schema.get("minLength", 0)))
        most = schema.get("maxLength")
        most = int(most) if isinstance(most, int | float) else None

        def fits(text: str) -> bool:
            return len(text) >= least and (most is None or len(text) <= most)

        fmt = _FORMATS.get(str(schema.get("format")))
        if fmt is not None:
            return fmt(self._rng, self.words((1, 1)))
        if isinstance(pattern := schema.get("pattern"), str):
            try:
                return sample(pattern, self._rng, fits)
            except UnsupportedRegex:
                pass  # documented: the words below, which may not match
        text = self.words(WORDS_PER_STRING)
        while len(text) < least:
            text += " " + self.words(WORDS_PER_STRING)
        if most is not None and len(text) > most:
            text = text[:most].rstrip() or text[:most]
        return text + "x" * (least - len(text))

    def number(self, schema: Mapping[str, Any], integer: bool) -> int | float:
        lo, lo_open = _bound(schema, "minimum", "exclusiveMinimum")
        hi, hi_open = _bound(schema, "maximum", "exclusiveMaximum")
        if lo is None:
            lo = 0.0 if hi is None else hi - 100
        if hi is None:
            hi = lo + 100
        step = schema.get("multipleOf")
        if integer or (isinstance(step, int) and step > 0):
            unit = step if isinstance(step, int) and step > 0 else 1
            first = math.ceil(lo / unit) + (lo_open and lo / unit == math.ceil(lo / unit))
            last = math.floor(hi / unit) - (hi_open and hi / unit == math.floor(hi / unit))
            return int(unit * (self._rng.randint(first, last) if first <= last else first))
        value = round(self._rng.uniform(lo, hi), 2)
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            value = (lo + hi) / 2
        return value

    def words(self, count: tuple[int, int]) -> str:
        """A few of the vocabulary's words, joined by spaces."""
        n = self._rng.randint(*count)
        return " ".join(self._rng.choice(self._words) for _ in range(n))


def _bound(schema: Mapping[str, Any], inclusive: str, exclusive: str) -> tuple[float | None, bool]:
    """A numeric bound (None: none) and whether it is open, in draft 4's form (a boolean beside the
    bound) or a later draft's (a number of its own)."""
    value = schema.get(inclusive)
    value = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    flag = schema.get(exclusive)
    if isinstance(flag, bool):
        return value, flag and value is not None
    if isinstance(flag, int | float):
        tighter = value is not None and (value > flag if inclusive == "minimum" else value < flag)
        return (value, False) if tighter else (float(flag), True)
    return value, False


def _flat(schema: Any) -> bool:
    """Whether a schema's values nest no further (no reference, not an object or array)."""
    if schema is True:
        return True
    nesting = {"$ref", "properties", "items", "prefixItems", "anyOf", "oneOf", "allOf"}
    return not nesting & set(schema) and schema.get("type") not in ("object", "array")


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Two schemas as one: properties, definitions and required lists joined, other keywords of
    ``extra`` winning."""
    out = dict(base)
    for key, value in extra.items():
        if key in _MERGED and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        elif key == "required" and isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = [*out[key], *(v for v in value if v not in out[key])]
        else:
            out[key] = value
    return out


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _time(rng: random.Random) -> str:
    return f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z"


_FORMATS: dict[str, Callable[[random.Random, str], str]] = {
    "date": lambda rng, word: _date(rng),
    "date-time": lambda rng, word: f"{_date(rng)}T{_time(rng)}",
    "time": lambda rng, word: _time(rng),
    "email": lambda rng, word: f"{word}@example.com",
    "uuid": lambda rng, word: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
    "uri": lambda rng, word: f"https://example.com/{word}",
    "url": lambda rng, word: f"https://example.com/{word}",
    "hostname": lambda rng, word: f"{word}.example.com",
    "ipv4": lambda rng, word: ".".join(str(rng.randrange(256)) for _ in range(4)),
    "ipv6": lambda rng, word: f"2001:db8::{rng.randrange(65536):x}",
}


def plain_words(texts: Sequence[str]) -> tuple[str, ...]:
    """Words for strings, from token texts: stripped, lower case, the empty ones left out."""
    return tuple(dict.fromkeys(w for w in (text.strip().lower() for text in texts) if w))


def document(schema: Any, rng: random.Random, words: Sequence[str]) -> Any:
    """A value valid against ``schema`` (see the module's note for what is honoured), its strings
    made of ``words``."""
    return SchemaValues(schema, rng, words).document()
