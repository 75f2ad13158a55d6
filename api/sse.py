"""Server-Sent Events framing, as OpenAI sends them: ``data: <payload>`` ended by a blank line.

Payloads are JSON written by orjson: compact, and UTF-8 as it is (``é``, not ``\\u00e9``), as
``vllm serve`` writes its chunks; several times faster than the standard library's encoder."""

from __future__ import annotations

from typing import Any

import orjson

PREFIX = b"data: "
END = b"\n\n"


def sse(payload: str) -> bytes:
    """One Server-Sent Event with ``payload`` as its data, ended by a blank line as OpenAI does."""
    return PREFIX + payload.encode() + END


def encode(chunk: dict[str, Any]) -> bytes:
    return PREFIX + orjson.dumps(chunk) + END


DONE = sse("[DONE]")
"""The last event of every stream that ends well."""
