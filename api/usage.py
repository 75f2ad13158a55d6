"""The Usage endpoint (``GET /v1/usage``): the shape of its answer, a tenant's own usage per hour
and model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class UsageBucket(BaseModel):
    object: Literal["usage.bucket"]
    start_time: int
    end_time: int
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


class UsageList(BaseModel):
    object: Literal["list"]
    tenant: str
    data: list[UsageBucket]
