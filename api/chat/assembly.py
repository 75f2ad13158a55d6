"""Chat completion answers, choice by choice: a streamed delta, or the whole assistant message.

A plain answer is its text. A richer one goes through a parser per choice (tool calls, a reasoning
model's reasoning: see ``serving/chat.py``, which wraps vLLM's parsers) and may carry the log
probabilities of its tokens; :class:`ChatStream` and :class:`ChatFull` assemble those.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from api.assembly import Family, FullAssembler, StreamAssembler, _chunk
from api.common import usage_dict
from shared.messages import Final, Logprobs, Tokens

OBJECT = "chat.completion"
OBJECT_CHUNK = "chat.completion.chunk"


def delta_choice(index: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    """One choice of a streamed chunk; the first of each choice carries the role."""
    delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def message_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    """One choice of a whole answer."""
    message = {"role": "assistant", "content": text, "refusal": None}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}


CHAT = Family(OBJECT, OBJECT_CHUNK, delta_choice, message_choice, fingerprint=True)


@dataclass(slots=True)
class ParsedDelta:
    """What a parser made of a piece of output: text, reasoning, and tool-call fragments (each
    ``{"index", "id"?, "type"?, "function": {"name"?, "arguments"?}}`` as OpenAI streams them)."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class ParsedMessage:
    """What a parser made of a whole answer (``tool_calls`` whole: id, type, function)."""

    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]]


class ChoiceParser(Protocol):
    named: bool
    """The request named the tool to call: its answer finishes with ``stop``, as OpenAI's does."""

    def delta(self, text: str, token_ids: Sequence[int], finished: bool) -> ParsedDelta | None: ...

    def whole(self, text: str, token_ids: Sequence[int]) -> ParsedMessage: ...

    def reasoning_tokens(self, token_ids: Sequence[int]) -> int: ...


def finish_reason(engine: str | None, called: bool, named: bool) -> str | None:
    """OpenAI's finish reason: ``tool_calls`` when the choice called tools and stopped by itself
    (a named tool's answer says ``stop``, as OpenAI's and vLLM's do)."""
    if engine == "stop" and called and not named:
        return "tool_calls"
    return engine


def logprobs_content(logprobs: Logprobs, top: int) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries for a message's tokens (the -9999 floor is vLLM's)."""
    out = []
    for i, (sampled, text) in enumerate(zip(logprobs.sampled, logprobs.texts, strict=False)):
        alternatives = logprobs.top[i][:top] if i < len(logprobs.top) else ()
        out.append(
            {
                "token": text,
                "logprob": max(sampled, -9999.0),
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": max(p, -9999.0), "bytes": list(t.encode())}
                    for _, p, t in alternatives
                ],
            }
        )
    return out


_CONTROLS = re.compile("[\x00-\x1f]")


def escape_controls(text: str) -> str:
    """JSON a grammar held, with raw control characters escaped (``\u001d``).

    xgrammar (0.2.8) lets them into a string whose schema bounds its length, where JSON forbids
    them; the text then does not parse. A grammar-held JSON answer has no whitespace between its
    tokens (the engine decodes JSON compact), so every such character is inside a string, and its
    escape is the same string to any JSON parser."""
    return _CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _pieces(reply: Tokens, escape: bool) -> list[tuple[str, tuple[int, ...]]]:
    """A message's output step by step when the worker said where steps end, else whole."""
    if not reply.steps:
        pieces = [(reply.text, reply.token_ids)]
    else:
        pieces, chars, tokens = [], 0, 0
        for n_chars, n_tokens in reply.steps:
            pieces.append((reply.text[chars : chars + n_chars], reply.token_ids[tokens : tokens + n_tokens]))
            chars, tokens = chars + n_chars, tokens + n_tokens
    return [(escape_controls(text), ids) for text, ids in pieces] if escape else pieces


def _merged(deltas: list[ParsedDelta]) -> ParsedDelta | None:
    if not deltas:
        return None
    out = ParsedDelta()
    for d in deltas:
        if d.content:
            out.content = (out.content or "") + d.content
        if d.reasoning:
            out.reasoning = (out.reasoning or "") + d.reasoning
        out.tool_calls += d.tool_calls
    return out


@dataclass
class ChatStream(StreamAssembler):
    """Streamed chunks of a chat answer that is more than text: parsed per choice, with the
    tokens' log probabilities when asked (``top``: the alternatives per token, or None)."""

    parsers: list[ChoiceParser] | None = None
    top: int | None = None
    json_held: bool = False
    """A grammar holds the answer to JSON: see :func:`escape_controls`."""
    _called: set[int] = field(default_factory=set)

    def events(self, reply: Tokens | Final) -> list[bytes]:
        from api.sse import encode

        if isinstance(reply, Final):
            return [encode(chunk) for chunk in self.final(reply)]
        return [encode(chunk) for chunk in self.tokens(reply)]

    def tokens(self, reply: Tokens) -> list[dict[str, Any]]:
        first = reply.index not in self._opened
        self._opened.add(reply.index)
        self._generated += len(reply.token_ids)
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if self.parsers is None:
            if reply.text or first:
                delta["content"] = escape_controls(reply.text) if self.json_held else reply.text
        else:
            parser = self.parsers[reply.index]
            pieces = _pieces(reply, self.json_held)
            finished = reply.finish_reason is not None
            parsed = _merged(
                [
                    d
                    for i, (text, ids) in enumerate(pieces)
                    if (d := parser.delta(text, ids, finished and i == len(pieces) - 1)) is not None
                ]
            )
            if first:
                delta["content"] = ""
            if parsed is not None:
                if parsed.content:
                    delta["content"] = (delta.get("content") or "") + parsed.content
                if parsed.reasoning:
                    delta["reasoning"] = delta["reasoning_content"] = parsed.reasoning
                if parsed.tool_calls:
                    delta["tool_calls"] = parsed.tool_calls
                    delta.setdefault("content", None)
                    self._called.add(reply.index)
        logprobs = None
        if self.top is not None and reply.logprobs is not None:
            logprobs = {"content": logprobs_content(reply.logprobs, self.top)}
        named = self.parsers is not None and self.parsers[reply.index].named
        finish = finish_reason(reply.finish_reason, reply.index in self._called, named)
        if not delta and logprobs is None and finish is None:
            return []
        choice = {"index": reply.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return [_chunk(self.meta, [choice], self._so_far())]


@dataclass
class ChatFull(FullAssembler):
    """A whole chat answer that is more than text (see :class:`ChatStream`)."""

    parsers: list[ChoiceParser] | None = None
    top: int | None = None
    json_held: bool = False
    _ids: dict[int, list[int]] = field(default_factory=dict)
    _logprobs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def restart(self) -> None:
        super().restart()
        self._ids.clear()
        self._logprobs.clear()

    def tokens(self, reply: Tokens) -> None:
        super().tokens(reply)
        self._ids.setdefault(reply.index, []).extend(reply.token_ids)
        if self.top is not None and reply.logprobs is not None:
            self._logprobs.setdefault(reply.index, []).extend(logprobs_content(reply.logprobs, self.top))

    def response(self, reply: Final) -> dict[str, Any]:
        choices = []
        reasoning_tokens = 0
        for index, reason in enumerate(reply.finish_reasons):
            text = "".join(self._texts.get(index, []))
            if self.json_held:
                text = escape_controls(text)
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            called = False
            if self.parsers is not None:
                parser, ids = self.parsers[index], self._ids.get(index, [])
                parsed = parser.whole(text, ids)
                message["content"] = parsed.content
                if parsed.tool_calls:
                    message["tool_calls"] = parsed.tool_calls
                    called = True
                if parsed.reasoning is not None:
                    message["reasoning"] = message["reasoning_content"] = parsed.reasoning
                    reasoning_tokens += parser.reasoning_tokens(ids)
                named = parser.named
            else:
                named = False
            logprobs = {"content": self._logprobs.get(index, [])} if self.top is not None else None
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(reason, called, named),
                }
            )
        usage: dict[str, Any] = usage_dict(reply.usage)
        if reasoning_tokens:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        return {
            "id": self.meta.id,
            "object": self.meta.object_full,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": None,
        }
