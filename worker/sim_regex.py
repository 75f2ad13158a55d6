"""Pure: a string that matches a regular expression, for the simulated engine's ``regex`` outputs and
JSON schema ``pattern`` strings.

It reads a common subset of the syntax: literals and escapes (``\\d \\w \\s``, their negations,
``\\n``, ``\\t``, ``\\xHH``, ``\\uHHHH``, an escaped metacharacter), ``.``, character classes with
ranges and negation, groups (capturing, ``(?:...)``, named), alternation, the quantifiers ``* + ?
{m} {m,} {m,n}`` (lazy or possessive alike) and the anchors ``^ $``. Unbounded repetitions stop a
few repeats past their minimum. Lookarounds, backreferences, inline flags and Unicode properties
raise :class:`UnsupportedRegex`, as does any result Python's ``re`` does not match in full (the
engine's grammar holds the whole text to the expression, so the result must match it whole).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

EXTRA_REPEATS = 3
"""Most repeats past the minimum of an unbounded quantifier (``*``, ``+``, ``{m,}``)."""
WIDE_REPEATS = 8
"""Most repeats past the minimum of a bounded one, however wide its bound."""
_ATTEMPTS = 8

_WORD = string.ascii_letters + string.digits + "_"
_PRINTABLE = "".join(chr(c) for c in range(32, 127))
_CLASSES = {
    "d": string.digits,
    "w": _WORD,
    "s": " ",
    "D": string.ascii_letters,
    "W": " -.,:;!?@#%&*+=/",
    "S": string.ascii_letters + string.digits,
}
_CONTROLS = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


class UnsupportedRegex(ValueError):
    """The expression uses syntax outside the subset, or no string drawn from it matched."""


@dataclass(frozen=True, slots=True)
class _Chars:
    options: str


@dataclass(frozen=True, slots=True)
class _Seq:
    items: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class _Alt:
    branches: tuple[_Seq, ...]


@dataclass(frozen=True, slots=True)
class _Repeat:
    item: object
    least: int
    most: int | None


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.text = pattern
        self.at = 0

    def peek(self) -> str:
        return self.text[self.at] if self.at < len(self.text) else ""

    def take(self) -> str:
        char = self.peek()
        if not char:
            raise UnsupportedRegex("the expression ends early")
        self.at += 1
        return char

    def alternation(self) -> _Alt:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.at += 1
            branches.append(self.sequence())
        return _Alt(tuple(branches))

    def sequence(self) -> _Seq:
        items: list[object] = []
        while self.peek() not in ("", "|", ")"):
            atom = self.atom()
            items.append(self.quantified(atom))
        return _Seq(tuple(items))

    def atom(self) -> object:
        char = self.take()
        if char == "(":
            if self.peek() == "?":
                self._group_prefix()
            inner = self.alternation()
            if self.take() != ")":
                raise UnsupportedRegex("an unclosed group")
            return inner
        if char == "[":
            return self.char_class()
        if char == ".":
            return _Chars(_PRINTABLE)
        if char in "^$":
            return _Seq(())
        if char == "\\":
            return self.escape(in_class=False)
        if char in "*+?{":
            raise UnsupportedRegex(f"a quantifier with nothing to repeat at {self.at - 1}")
        return _Chars(char)

    def _group_prefix(self) -> None:
        self.at += 1
        kind = self.take()
        if kind == ":":
            return
        if (kind == "P" and self.peek() == "<") or (kind == "<" and self.peek() not in "=!"):
            end = self.text.find(">", self.at)
            if end < 0:
                raise UnsupportedRegex("an unclosed group name")
            self.at = end + 1
            return
        raise UnsupportedRegex(f"the group syntax (?{kind} is outside the supported subset")

    def escape(self, in_class: bool) -> _Chars:
        char = self.take()
        if char in _CLASSES:
            return _Chars(_CLASSES[char])
        if char in _CONTROLS:
            return _Chars(_CONTROLS[char])
        if char in "xu":
            width = 2 if char == "x" else 4
            digits = self.text[self.at : self.at + width]
            self.at += width
            try:
                return _Chars(chr(int(digits, 16)))
            except ValueError as exc:
                raise UnsupportedRegex(f"a bad \\{char} escape") from exc
        if char == "b" and in_class:
            return _Chars("\b")
        if char.isalnum():  # \b, \B, backreferences, \p{...}: not in the subset
            raise UnsupportedRegex(f"the escape \\{char} is outside the supported subset")
        return _Chars(char)

    def char_class(self) -> _Chars:
        negated = self.peek() == "^"
        if negated:
            self.at += 1
        members: list[str] = []
        first = True
        while True:
            char = self.take()
            if char == "]" and not first:
                break
            first = False
            if char == "\\":
                members.append(self.escape(in_class=True).options)
                continue
            if char == "[" and self.peek() == ":":
                raise UnsupportedRegex("POSIX classes are outside the supported subset")
            if self.peek() == "-" and self.text[self.at + 1 : self.at + 2] not in ("]", ""):
                self.at += 1
                end = self.take()
                if end == "\\":
                    end = self.escape(in_class=True).options
                if len(end) != 1 or ord(end) < ord(char):
                    raise UnsupportedRegex("a bad range in a character class")
                members.append("".join(chr(c) for c in range(ord(char), ord(end) + 1)))
                continue
            members.append(char)
        chosen = "".join(members)
        if negated:
            chosen = "".join(c for c in _PRINTABLE if c not in chosen)
        if not chosen:
            raise UnsupportedRegex("a character class nothing matches")
        return _Chars(chosen)

    def quantified(self, atom: object) -> object:
        char = self.peek()
        if char == "*":
            least, most = 0, None
        elif char == "+":
            least, most = 1, None
        elif char == "?":
            least, most = 0, 1
        elif char == "{" and (bounds := re.match(r"\{(\d+)(,(\d*))?\}", self.text[self.at :])):
            least = int(bounds.group(1))
            most = least if bounds.group(2) is None else (int(bounds.group(3)) if bounds.group(3) else None)
            self.at += len(bounds.group(0)) - 1
        else:
            return atom
        self.at += 1
        if self.peek() in ("?", "+"):  # lazy or possessive: the same strings match
            self.at += 1
        return _Repeat(atom, least, most)


def _draw(node: object, rng: random.Random, out: list[str]) -> None:
    if isinstance(node, _Chars):
        out.append(node.options[rng.randrange(len(node.options))])
    elif isinstance(node, _Seq):
        for item in node.items:
            _draw(item, rng, out)
    elif isinstance(node, _Alt):
        _draw(node.branches[rng.randrange(len(node.branches))], rng, out)
    elif isinstance(node, _Repeat):
        extra = EXTRA_REPEATS if node.most is None else min(node.most - node.least, WIDE_REPEATS)
        for _ in range(rng.randint(node.least, node.least + max(0, extra))):
            _draw(node.item, rng, out)


def parse(pattern: str) -> object:
    """The expression's tree; UnsupportedRegex when it is outside the subset."""
    parser = _Parser(pattern)
    tree = parser.alternation()
    if parser.at != len(pattern):
        raise UnsupportedRegex(f"an unmatched ')' at {parser.at}")
    return tree


def sample(pattern: str, rng: random.Random, fits: Callable[[str], bool] | None = None) -> str:
    """A string ``pattern`` matches in full (and, given ``fits``, one it accepts: a length check).

    Raises UnsupportedRegex when the expression is outside the subset or no draw both matches and fits.
    """
    tree = parse(pattern)
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise UnsupportedRegex(f"Python cannot compile it: {exc}") from exc
    for _ in range(_ATTEMPTS):
        out: list[str] = []
        _draw(tree, rng, out)
        text = "".join(out)
        if compiled.fullmatch(text) and (fits is None or fits(text)):
            return text
    raise UnsupportedRegex("no string drawn from the expression matched it")
