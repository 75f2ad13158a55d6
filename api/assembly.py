"""Pure functions turning worker replies into OpenAI answers: streamed chunks as the bytes of their
Server-Sent Events, or one whole body. What a choice looks like is each endpoint family's own
(its :class:`Family`, in :mod:`api.chat.assembly` and :mod:`api.completions.assembly`); this module
puts choices into chunks and answers, and keeps count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from api.common import usage_dict
from api.sse import encode
from shared.messages import Final, Tokens, Usage


@dataclass(frozen=True, slots=True)
class Family:
    """What the answers of one endpoint family look like."""

    object: str
    object_chunk: str
    delta_choice: Callable[[int, str, str | None, bool], dict[str, Any]]
    """(index, text, finish reason, first of its choice) -> one choice of a streamed chunk."""
    message_choice: Callable[[int, str, str | None], dict[str, Any]]
    """(index, text, finish reason) -> one choice of a whole answer."""
    fingerprint: bool = False
    """Chunks and answers carry ``system_fingerprint`` (null)."""


@dataclass(frozen=True, slots=True)
class Meta:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str
    family: Family

    @property
    def object_stream(self) -> str:
        return self.family.object_chunk

    @property
    def object_full(self) -> str:
        return self.family.object


def _chunk(meta: Meta, choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": meta.id,
        "object": meta.object_stream,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    }
    if meta.family.fingerprint:
        body["system_fingerprint"] = None
    if usage is not None:
        body["usage"] = usage_dict(usage)
    return body


def _choice(meta: Meta, index: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    return meta.family.delta_choice(index, text, finish, first)


_MARK = "\x00text\x00"
_QUOTED_MARK = orjson.dumps(_MARK)


@dataclass
class StreamAssembler:
    """Builds the streamed chunks of one response, reply by reply.

    ``include_usage`` adds a last chunk with the request's usage; ``continuous_usage`` (vLLM's
    ``stream_options.continuous_usage_stats``, which needs ``include_usage`` too) also puts the
    usage so far on every chunk, counted from the tokens sent.
    """

    meta: Meta
    include_usage: bool
    continuous_usage: bool = False
    prompt_tokens: int = 0
    _opened: set[int] = field(default_factory=set)
    _generated: int = 0
    _templates: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    def events(self, reply: Tokens | Final) -> list[bytes]:
        """The SSE events of one reply. Most are a choice's next text and nothing else: those are
        written from a template of the same chunk (its event's bytes around the text), so the hot
        path does not build and serialize a dict per message; the rest go through :meth:`tokens` or
        :meth:`final`."""
        if isinstance(reply, Final):
            return [encode(chunk) for chunk in self.final(reply)]
        plain = reply.finish_reason is None and reply.text and not self.continuous_usage
        if not plain or reply.index not in self._opened:
            return [encode(chunk) for chunk in self.tokens(reply)]
        self._generated += len(reply.token_ids)
        before, after = self._template(reply.index)
        return [before + orjson.dumps(reply.text) + after]

    def _template(self, index: int) -> tuple[bytes, bytes]:
        template = self._templates.get(index)
        if template is None:
            chunk = _chunk(self.meta, [_choice(self.meta, index, _MARK, None, False)])
            before, _, after = encode(chunk).partition(_QUOTED_MARK)
            template = self._templates[index] = (before, after)
        return template

    def tokens(self, reply: Tokens) -> list[dict[str, Any]]:
        first = reply.index not in self._opened
        self._opened.add(reply.index)
        self._generated += len(reply.token_ids)
        if not reply.text and not first and reply.finish_reason is None:
            return []
        choice = _choice(self.meta, reply.index, reply.text, reply.finish_reason, first)
        return [_chunk(self.meta, [choice], self._so_far())]

    def _so_far(self) -> Usage | None:
        if not self.continuous_usage:
            return None
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self._generated)

    def final(self, reply: Final) -> list[dict[str, Any]]:
        """Choices that never produced a token still get their opening and finish chunk."""
        out = [
            _chunk(self.meta, [_choice(self.meta, i, "", reason, True)], self._so_far())
            for i, reason in enumerate(reply.finish_reasons)
            if i not in self._opened
        ]
        if self.include_usage:
            out.append(_chunk(self.meta, [], reply.usage))
        return out


@dataclass
class FullAssembler:
    """Gathers a whole response for ``stream: false``."""

    meta: Meta
    _texts: dict[int, list[str]] = field(default_factory=dict)

    def restart(self) -> None:
        """Forget what was gathered: the job starts over (a new worker took it from the top)."""
        self._texts.clear()

    def tokens(self, reply: Tokens) -> None:
        self._texts.setdefault(reply.index, []).append(reply.text)

    def response(self, reply: Final) -> dict[str, Any]:
        choices = [
            self.meta.family.message_choice(index, "".join(self._texts.get(index, [])), reason)
            for index, reason in enumerate(reply.finish_reasons)
        ]
        body: dict[str, Any] = {
            "id": self.meta.id,
            "object": self.meta.object_full,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
            "usage": usage_dict(reply.usage),
        }
        if self.meta.family.fingerprint:
            body["system_fingerprint"] = None
        return body
