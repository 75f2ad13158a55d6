"""Chat completion answers, choice by choice: a streamed delta, or the whole assistant message."""

from __future__ import annotations

from typing import Any

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
