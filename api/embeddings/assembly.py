"""Pure: an embedding job's vector messages become OpenAI's answer, as one body (a batch line's
answer) or as the pieces of one (an HTTP response, written a few vectors at a time: 2,048 vectors
of 1,024 numbers are 40 MB of JSON, seconds of formatting that must not hold the event loop at
once)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from api.embeddings.protocol import EncodingFormat
from shared.messages import Usage, Vectors, WireError, floats

OBJECT = "list"
PIECE_VALUES = 16_384
"""Numbers written per piece of a body: a few milliseconds of formatting."""
_MARK = "\x00data\x00"


def usage_dict(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}


@dataclass
class EmbeddingAnswer:
    """Gathers one request's vectors, in input order, and writes the answer."""

    id: str
    created: int
    model: str
    count: int
    """Inputs of the request: one vector each."""
    encoding: EncodingFormat = "float"
    _vectors: list[bytes | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Forget what was gathered: the job starts over (a new worker took it from the top)."""
        self._vectors = [None] * self.count

    def add(self, reply: Vectors) -> None:
        if reply.start < 0 or reply.start + reply.count > self.count:
            raise WireError(f"vectors {reply.start}..{reply.start + reply.count - 1} of {self.count} inputs")
        self._vectors[reply.start : reply.start + reply.count] = reply.raw()

    def missing(self) -> int:
        return sum(v is None for v in self._vectors)

    def item(self, index: int) -> dict[str, Any]:
        raw = self._vectors[index]
        if raw is None:
            raise WireError(f"no vector for input {index}")
        value: list[float] | str = floats(raw) if self.encoding == "float" else base64.b64encode(raw).decode()
        return {"index": index, "object": "embedding", "embedding": value}

    def _frame(self, usage: Usage, data: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": OBJECT,
            "created": self.created,
            "model": self.model,
            "data": data,
            "usage": usage_dict(usage),
        }

    def body(self, usage: Usage) -> dict[str, Any]:
        """The whole answer as one object."""
        return self._frame(usage, [self.item(i) for i in range(self.count)])

    def pieces(self, usage: Usage) -> Iterator[bytes]:
        """The answer's JSON text, in pieces of about :data:`PIECE_VALUES` numbers each."""
        frame = json.dumps(self._frame(usage, _MARK), separators=(",", ":"))
        before, _, after = frame.partition(json.dumps(_MARK))
        piece, values = [before + "["], 0
        for i in range(self.count):
            if i:
                piece.append(",")
            piece.append(json.dumps(self.item(i), separators=(",", ":")))
            values += len(self._vectors[i] or b"") // 4
            if values >= PIECE_VALUES:
                yield "".join(piece).encode()
                piece, values = [], 0
        piece.append("]" + after)
        yield "".join(piece).encode()
