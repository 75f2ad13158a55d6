"""How a job's engine output becomes token messages: pure functions, no I/O.

A choice's first token goes out at once (time to first token is what clients feel), later ones at
the ticks of a flush interval, so a message carries many tokens and Redis, the gateway and the
client's connection see far fewer messages than tokens. Once every choice has finished, what is
left waits for the final message.

Two things keep the path's cost per token down under load:
- the interval grows with the jobs a worker runs (:func:`flush_interval`): each message costs the
  same whatever it carries, so with many streams a few more tokens per message save the CPU the
  engine needs (a reader still sees text at least ten times a second);
- every job of a worker flushes on the same grid of ticks, so the engine step after a tick sends
  all their messages at once, in one pipelined write, rather than one write per job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared.messages import FinishReason, Logprobs, Sampling
from worker.engine import Delta, TokenLogprobs


class EngineAborted(RuntimeError):
    """The engine ended a choice without finishing it."""


@dataclass
class Chunk:
    """Tokens of one choice not yet published."""

    index: int
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    counts: list[int] = field(default_factory=list)
    """Tokens of each delta (one engine step each), beside ``texts``."""
    sampled: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    top: list[tuple[tuple[int, float, str], ...]] = field(default_factory=list)
    prompt: Logprobs | None = None
    """The prompt's log probabilities, on the job's first chunk when it asked."""

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, delta: Delta) -> None:
        self.texts.append(delta.text)
        self.ids.extend(delta.token_ids)
        self.counts.append(len(delta.token_ids))
        if delta.logprobs is not None:
            self.sampled += delta.logprobs.sampled
            self.token_texts += delta.logprobs.texts
            self.top += delta.logprobs.top
        if delta.finish_reason is not None:
            self.finish = delta.finish_reason

    def logprobs(self) -> Logprobs | None:
        if not self.sampled:
            return None
        return Logprobs(sampled=tuple(self.sampled), texts=tuple(self.token_texts), top=tuple(self.top))

    def steps(self) -> tuple[tuple[int, int], ...]:
        """(characters, tokens) of each engine step, in order."""
        return tuple((len(t), n) for t, n in zip(self.texts, self.counts, strict=True))


@dataclass(frozen=True, slots=True)
class Ending:
    """What a job's last message says: the tokens not sent yet, each choice's finish reason and how
    many tokens the job generated in all (earlier attempts included)."""

    tail: list[Chunk]
    finish_reasons: tuple[FinishReason, ...]
    generated: int


FLUSH_KNEE = 16
"""At this many jobs a worker flushes each job every base interval."""


def flush_interval(base: float, most: float, jobs: int) -> float:
    """Seconds between a job's messages when its worker runs ``jobs`` jobs: in proportion to the
    jobs, ``base`` at FLUSH_KNEE of them, never above ``most``. So the worker publishes about
    FLUSH_KNEE / ``base`` messages a second whatever its load (400 by default), until ``most``
    caps the interval: a message costs about the same CPU whatever it carries, and a worker with
    few jobs spends what it has spare on sending their tokens more often (a lone stream gets them
    every engine step), one with many on carrying more tokens in each message."""
    return min(most, base * max(jobs, 1) / FLUSH_KNEE)


def next_tick(now: float, interval: float) -> float:
    """The first tick of the worker's flush grid after ``now`` (the same for every job)."""
    if interval <= 0:
        return now
    return (math.floor(now / interval) + 1) * interval


class Coalescer:
    def __init__(self, n: int, now: float, prior: int = 0) -> None:
        self._reasons: list[FinishReason | None] = [None] * n
        self._pending: dict[int, Chunk] = {}
        self._opened: set[int] = set()
        self._due = now
        self.generated = prior
        self._prompt: Logprobs | None = None

    def add(self, deltas: list[Delta], now: float, interval: float) -> list[Chunk]:
        """Take one engine step's deltas; returns the chunks to publish now (often none).
        ``interval``: the worker's flush interval now (see :func:`flush_interval`)."""
        urgent = False
        for d in deltas:
            if d.prompt_logprobs is not None:
                self._prompt = _wire(d.prompt_logprobs)
            chunk = self._pending.get(d.index)
            if chunk is None:
                chunk = self._pending[d.index] = Chunk(d.index)
            chunk.add(d)
            self.generated += len(d.token_ids)
            if d.finish_reason is not None:
                self._reasons[d.index] = d.finish_reason
            if d.index not in self._opened:
                self._opened.add(d.index)
                urgent = True
        due = urgent or now >= self._due
        if not (self._pending and due and None in self._reasons):
            return []
        self._due = next_tick(now, interval)
        return self._take()

    def end(self) -> Ending:
        """After the engine's last step: the job's ending, or EngineAborted if a choice did not finish."""
        if any(r in (None, "abort") for r in self._reasons):
            raise EngineAborted("the engine stopped the request before it finished")
        reasons = tuple(r for r in self._reasons if r is not None)
        return Ending(tail=self._take(), finish_reasons=reasons, generated=self.generated)

    def finish_all(self, reason: FinishReason) -> None:
        """Mark every choice finished without generating (nothing was left to generate)."""
        self._reasons = [reason] * len(self._reasons)

    def _take(self) -> list[Chunk]:
        chunks = [self._pending[i] for i in sorted(self._pending)]
        self._pending = {}
        if chunks and self._prompt is not None:
            # On the first message published, whichever choice it is: the gateway must have the
            # prompt's log probabilities before the first choice's text.
            chunks[0].prompt, self._prompt = self._prompt, None
        return chunks


def _wire(logprobs: TokenLogprobs) -> Logprobs:
    return Logprobs(sampled=tuple(logprobs.sampled), texts=tuple(logprobs.texts), top=tuple(logprobs.top))


def resumed(sampling: Sampling, prior: int) -> Sampling | None:
    """The sampling that continues a job after ``prior`` tokens already sent to the client, or
    ``None`` when the earlier attempt generated everything and only the final message is missing.
    The prompt's log probabilities went out with the first tokens: a resumed job does not ask again
    (its prompt now holds the tokens sent, too)."""
    left = sampling.max_tokens - prior
    if left <= 0:
        return None
    if prior == 0:
        return sampling
    update = {"max_tokens": left, "min_tokens": max(0, sampling.min_tokens - prior), "prompt_logprobs": None}
    return sampling.model_copy(update=update)
