"""JSON schemas as xgrammar grammars whose strings can only hold text.

xgrammar (0.2.8) reads a string's characters from UTF-8 bytes without refusing the encoded
surrogates U+D800-U+DFFF (``ED A0 80`` to ``ED BF BF``), and it lowers a string with ``minLength`` or
``maxLength`` to a bounded run of any character but quote, backslash, CR and LF, raw control
characters included. A model whose vocabulary holds single bytes (every byte-level BPE does) can so
write a string that is not text: decoded, each of a surrogate's three bytes becomes U+FFFD and the
string outgrows its ``maxLength``; a raw control character is invalid JSON to a strict parser. The
demo model's random weights do this now and then; either way the answer breaks its schema, which
for a forced tool call is a broken promise. llguidance (the ``guidance`` backend) refuses both.

So for xgrammar the worker compiles the schema to xgrammar's grammar text itself, with the options
vLLM would use, narrows every negated character class (each is a string's character; no other part
of JSON has one) to leave out the surrogates and U+0000-U+001F, and gives the engine that grammar in
place of the schema. Anything it cannot convert goes to the engine unchanged.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

EXCLUDED = r"\0-\x1f\uD800-\uDFFF"
"""What no character of a JSON string may be, raw: a control character or a surrogate."""


@functools.lru_cache(maxsize=256)
def text_only_grammar(schema: str, compact: bool = True) -> str | None:
    """xgrammar's grammar for ``schema`` (serialized) with strings that hold only text, or ``None``
    where xgrammar cannot convert it (the engine then reports the schema as it always has).

    ``compact`` is the worker's ``disable_any_whitespace`` (always on): no whitespace between
    tokens, the separators vLLM passes for it."""
    import xgrammar as xgr

    try:
        grammar = xgr.Grammar.from_json_schema(
            schema,
            any_whitespace=not compact,
            separators=(",", ":") if compact else None,
        )
        narrowed = narrow_negated_classes(str(grammar))
        xgr.Grammar.from_ebnf(narrowed)  # it must still parse; a newer xgrammar may print otherwise
    except Exception as exc:  # xgrammar raises RuntimeError or ValueError; any means "leave it"
        log.debug("schema left to the engine as it is: %s", exc)
        return None
    return narrowed


def narrow_negated_classes(ebnf: str) -> str:
    """``ebnf`` with :data:`EXCLUDED` added to every negated character class (``[^...]``) outside
    quoted literals (a ``Regex("...")`` pattern is a literal and stays as written)."""
    out: list[str] = []
    i, n = 0, len(ebnf)
    while i < n:
        c = ebnf[i]
        if c == '"':
            end = _closing(ebnf, i, '"')
            out.append(ebnf[i:end])
            i = end
        elif c == "[":
            end = _closing(ebnf, i, "]")
            body = ebnf[i + 1 : end - 1]
            out.append(f"[{body}{EXCLUDED}]" if body.startswith("^") else ebnf[i:end])
            i = end
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _closing(text: str, start: int, close: str) -> int:
    """The index just past the ``close`` that ends what opens at ``start`` (a quoted literal or a
    character class), backslash escapes skipped."""
    i = start + 1
    while i < len(text) and text[i] != close:
        i += 2 if text[i] == "\\" else 1
    return i + 1
