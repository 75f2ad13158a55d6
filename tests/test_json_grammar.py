"""The xgrammar grammar a worker makes of a JSON schema: strings hold only text (worker/json_grammar.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import xgrammar as xgr

from shared.messages import Sampling, StructuredOutput
from worker.json_grammar import narrow_negated_classes, text_only_grammar
from worker.vllm_engine import sampling_params

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "note": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "note", "unit"],
    "additionalProperties": False,
}
SURROGATE = b"\xed\xa0\x80"  # U+D800 as UTF-8 would spell it; no text holds it


def accepts(grammar: xgr.Grammar, answer: bytes) -> bool:
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(xgr.TokenizerInfo(["a"])).compile_grammar(grammar))
    return matcher.accept_string(answer) and matcher.is_completed()


def answer(city: bytes, note: bytes = b"fine") -> bytes:
    return b'{"city":"' + city + b'","note":"' + note + b'","unit":"celsius"}'


@pytest.fixture(scope="module")
def narrowed() -> xgr.Grammar:
    text = text_only_grammar(json.dumps(WEATHER))
    assert text is not None
    return xgr.Grammar.from_ebnf(text)


def test_xgrammar_alone_lets_a_string_hold_what_is_not_text() -> None:
    """Why the worker narrows the grammar: if this fails, xgrammar has mended it itself."""
    plain = xgr.Grammar.from_json_schema(json.dumps(WEATHER), any_whitespace=False, separators=(",", ":"))
    assert accepts(plain, answer(b"thing roM:" + SURROGATE))
    assert accepts(plain, answer(b"thing\x11 roM:"))


def test_strings_hold_neither_surrogates_nor_raw_control_characters(narrowed: xgr.Grammar) -> None:
    assert not accepts(narrowed, answer(b"thing roM:" + SURROGATE))
    assert not accepts(narrowed, answer(b"Oslo", note=SURROGATE))
    assert not accepts(narrowed, answer(b"thing\x11 roM:"))
    assert not accepts(narrowed, answer(b"Oslo", note=b"a\tb"))
    # Escapes stay where xgrammar allows them (not in a length-bounded string: its own limit).
    assert accepts(narrowed, answer(b"Oslo", note=b"a\\tb\\u00e9"))


def test_what_is_text_still_passes_and_lengths_count_characters(narrowed: xgr.Grammar) -> None:
    twelve = "Zürich ☀ 😀ab"
    assert len(twelve) == 12
    assert accepts(narrowed, answer(twelve.encode()))
    assert not accepts(narrowed, answer((twelve + "c").encode()))
    assert accepts(narrowed, answer(b"", note="naïve 日本 \U0001f600".encode()))
    assert accepts(narrowed, answer(b"\xed\x9f\xbf"))  # U+D7FF, just below the surrogates


def test_patterns_are_literals_and_stay_as_written() -> None:
    schema = {
        "type": "object",
        "properties": {"p": {"type": "string", "pattern": "^[^a]+$"}},
        "required": ["p"],
    }
    text = text_only_grammar(json.dumps(schema))
    assert text is not None
    assert 'Regex("^[^a]+$"' in text
    assert narrow_negated_classes('x ::= "[^a]" [^b] [a-z]') == r'x ::= "[^a]" [^b\0-\x1f\uD800-\uDFFF] [a-z]'


def test_what_xgrammar_cannot_convert_goes_to_the_engine_unchanged() -> None:
    assert text_only_grammar("{not json") is None
    wire = Sampling(max_tokens=8, structured_output=StructuredOutput(json_schema="{not json"))
    assert sampling_params(wire, xgrammar=True).structured_outputs.json == "{not json"  # type: ignore[union-attr]


@pytest.mark.parametrize("xgrammar", [True, False], ids=["xgrammar", "guidance"])
def test_the_engine_gets_the_grammar_only_from_xgrammar(xgrammar: bool) -> None:
    schema = json.dumps(WEATHER)
    wire = Sampling(max_tokens=8, structured_output=StructuredOutput(json_schema=schema))
    outputs: Any = sampling_params(wire, xgrammar=xgrammar).structured_outputs
    if xgrammar:
        assert outputs.json is None and outputs.grammar == text_only_grammar(schema)
    else:
        assert outputs.json == schema and outputs.grammar is None
