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
class TokenLogprobs:
    """Log probabilities of a delta's tokens: each sampled token's, its text, and per token the
    (id, log probability, text) of the sampled token and the alternatives, as the engine lists them."""

    sampled: list[float]
    texts: list[str]
    top: list[tuple[tuple[int, float, str], ...]]


@dataclass(frozen=True, slots=True)
class Delta:
    """What one choice produced since its previous delta."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float


class EngineRejected(ValueError):
    """The engine refused a request as invalid (prompt too long, bad sampling values...)."""


class EngineFailed(RuntimeError):
    """The engine ended a request with an error of its own (e.g. a grammar it could not compile)."""


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
        reasoning_ended: bool | None = None,
        *,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[list[Delta]]:
        """Stream the request's deltas, one list per engine step. Closing the generator (or cancelling
        the task iterating it) aborts the request in the engine. ``reasoning_ended`` tells an engine
        with a reasoning parser whether the prompt already closed the reasoning (None: it checks).
        Prefix-cache entries are shared only between requests of the same ``cache_salt``."""
        ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
