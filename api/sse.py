"""Server-Sent Events framing, as OpenAI sends them: ``data: <payload>`` ended by a blank line."""

from __future__ import annotations

import json
from typing import Any


def sse(payload: str) -> bytes:
    """One Server-Sent Event with ``payload`` as its data, ended by a blank line as OpenAI does."""
    return b"data: " + payload.encode() + b"\n\n"


def encode(chunk: dict[str, Any]) -> bytes:
    return sse(json.dumps(chunk, separators=(",", ":")))


DONE = sse("[DONE]")
"""The last event of every stream that ends well."""
