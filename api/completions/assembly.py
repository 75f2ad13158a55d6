"""Text completion answers, choice by choice: streamed or whole, a choice is its text."""

from __future__ import annotations

from typing import Any

from api.assembly import Family

OBJECT = OBJECT_CHUNK = "text_completion"


def delta_choice(index: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    """One choice of a streamed chunk (a text completion's chunks look alike from the first on)."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def message_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    """One choice of a whole answer."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


TEXT = Family(OBJECT, OBJECT_CHUNK, delta_choice, message_choice)
