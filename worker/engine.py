"""The engine a worker drives, as a small interface: what the job runner needs and nothing more.

:mod:`worker.vllm_engine` implements it on vLLM's in-process ``AsyncLLM``. This module imports no
engine, so code (and tests) that never run a model stay cheap to import.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.messages import FinishReason, Sampling


@dataclass(frozen=True, slots=True)
class Delta:
    """What one choice produced since its previous delta."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float


class EngineRejected(ValueError):
    """The engine refused a request as invalid (prompt too long, bad sampling values...)."""


class Engine(Protocol):
    model_name: str
    tokenizer_source: str
    max_model_len: int
    kind: str
    """``vllm``, or ``sim`` for the simulated engine; workers advertise it."""

    def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: Sampling,
        *,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[list[Delta]]:
        """Stream the request's deltas, one list per engine step. Closing the generator (or cancelling
        the task iterating it) aborts the request in the engine. Prefix-cache entries are shared only
        between requests of the same ``cache_salt``."""
        ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
