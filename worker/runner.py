"""Runs one job on the engine and publishes its replies, coalesced, in order."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

from shared.messages import Failure, Final, FinishReason, Job, Started, Tokens, Usage, encode
from shared.names import GROUP, HANDED_BACK_FIELD, JOB_FIELD, Names
from worker.engine import Delta, Engine, EngineRejected
from worker.metrics import WorkerMetrics
from worker.outbox import Command, Outbox

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Claim:
    """A job this worker holds: where it came from and how many times it was delivered."""

    stream: str
    entry_id: str
    job: Job
    attempt: int
    handed_back: bool = False
    """Re-queued by a worker that shut down mid-job: look for its progress even on attempt 1."""


StopReason = Literal["client", "lost"]
"""Why a job was stopped early: its client left, or another worker took it over."""


class EngineAborted(RuntimeError):
    """The engine ended a choice without finishing it."""


@dataclass
class _Pending:
    """Tokens of one choice not yet published."""

    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None

    def add(self, delta: Delta) -> None:
        self.texts.append(delta.text)
        self.ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish = delta.finish_reason


# Publish a token batch and record it in the job's progress list in one atomic step, so the
# progress a successor resumes from is exactly what the client was sent.
# KEYS: progress list. ARGV: channel, payload, progress entry, ttl ms.
PUBLISH_WITH_PROGRESS = """
redis.call('RPUSH', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""
PROGRESS_TTL_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Progress:
    """What earlier attempts of a job already published: resume from here."""

    last_seq: int
    token_ids: tuple[int, ...]

    @classmethod
    def parse(cls, entries: list[bytes]) -> Progress | None:
        if not entries:
            return None
        ids: list[int] = []
        last = -1
        for raw in entries:
            entry = json.loads(raw)
            ids.extend(entry["t"])
            last = max(last, int(entry["s"]))
        return cls(last_seq=last, token_ids=tuple(ids))


class ReplyChannel:
    """Publishes one job's replies with consecutive sequence numbers.

    With ``progress_key`` every token batch is also recorded (single-choice jobs only: several
    choices cannot be resumed one by one), which lets another worker resume the stream exactly.
    """

    def __init__(
        self,
        outbox: Outbox,
        channel: str,
        published: Callable[[], None],
        progress_key: str | None = None,
        first_seq: int = 0,
    ) -> None:
        self._outbox = outbox
        self.channel = channel
        self._published = published
        self._progress_key = progress_key
        self._seq = first_seq

    def next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def tokens(self, pending: dict[int, _Pending]) -> list[Tokens]:
        return [
            Tokens(
                seq=self.next_seq(),
                index=i,
                text="".join(p.texts),
                token_ids=tuple(p.ids),
                finish_reason=p.finish,
            )
            for i, p in sorted(pending.items())
        ]

    def publish_command(self, payload: str) -> Command:
        self._published()
        return ("PUBLISH", self.channel, payload)

    def token_command(self, message: Tokens) -> Command:
        if self._progress_key is None:
            return self.publish_command(encode(message))
        self._published()
        entry = json.dumps({"s": message.seq, "t": message.token_ids}, separators=(",", ":"))
        return (
            "EVAL",
            PUBLISH_WITH_PROGRESS,
            1,
            self._progress_key,
            self.channel,
            encode(message),
            entry,
            PROGRESS_TTL_MS,
        )

    async def publish(self, messages: list[Tokens]) -> None:
        await self._outbox.send(*(self.token_command(m) for m in messages))


class JobRunner:
    def __init__(
        self,
        outbox: Outbox,
        names: Names,
        engine: Engine,
        worker_id: str,
        flush_interval: float,
        stop_reason: Callable[[str], StopReason | None],
        metrics: WorkerMetrics,
    ) -> None:
        self._metrics = metrics
        self._stop_reason = stop_reason
        self._outbox = outbox
        self._names = names
        self._engine = engine
        self._worker_id = worker_id
        self._flush_interval = flush_interval

    async def run(self, claim: Claim) -> None:
        """Run the job to its end and acknowledge it. Raises only CancelledError."""
        job = claim.job
        progress = await self._progress(claim)
        out = ReplyChannel(
            self._outbox,
            self._names.reply_channel(job.id),
            self._metrics.published,
            progress_key=self._names.progress(job.id) if job.sampling.n == 1 else None,
            first_seq=progress.last_seq + 1 if progress else 0,
        )
        try:
            if not await self._start(claim, out, progress):
                await self.acknowledge(claim)
                return
            tail, final = await self._generate(job, out, progress.token_ids if progress else ())
        except asyncio.CancelledError:
            # The client left (nothing more to say), or this worker is shutting down: hand the job
            # back when it can be resumed elsewhere, else tell the client.
            reason = self._stop_reason(job.id)
            if reason == "lost":
                # another worker owns the job now: its entry and progress are not ours to touch
                self._metrics.outcome("cancelled")
            elif reason == "client":
                await self.acknowledge(claim)
            elif job.sampling.n == 1:
                await self.hand_back(claim)
            else:
                await self.fail(
                    claim, out, 503, "worker_shutdown", "the worker stopped before the job finished"
                )
            raise
        except EngineRejected as exc:
            await self.fail(claim, out, 400, "invalid_request", str(exc))
            return
        except EngineAborted as exc:
            await self.fail(claim, out, 503, "engine_aborted", str(exc))
            return
        except Exception as exc:  # the client must hear of any failure: log it and report it
            log.exception("job %s failed", job.id)
            await self.fail(claim, out, 500, "engine_error", f"generation failed: {type(exc).__name__}")
            return
        await self._finish(claim, out, [*(encode(m) for m in tail), encode(final)])
        self._metrics.outcome("completed")

    async def _progress(self, claim: Claim) -> Progress | None:
        """What an earlier attempt published, when this is a retry or a hand-back."""
        if claim.attempt <= 1 and not claim.handed_back:
            return None
        (entries,) = await self._outbox.send(("LRANGE", self._names.progress(claim.job.id), 0, -1))
        return Progress.parse(entries)

    async def _start(self, claim: Claim, out: ReplyChannel, progress: Progress | None) -> bool:
        """Announce the job; False if its client already gave up."""
        resumed = len(progress.token_ids) if progress else 0
        started = Started(
            seq=out.next_seq(), worker=self._worker_id, attempt=claim.attempt, resumed_tokens=resumed
        )
        cancelled, _ = await self._outbox.send(
            ("EXISTS", self._names.cancelled(claim.job.id)), out.publish_command(encode(started))
        )
        return not cancelled

    async def _generate(
        self, job: Job, out: ReplyChannel, prior: tuple[int, ...]
    ) -> tuple[list[Tokens], Final]:
        """Generate (continuing after ``prior`` tokens, if any) and coalesce into messages."""
        n = job.sampling.n
        reasons: list[FinishReason | None] = [None] * n
        pending: dict[int, _Pending] = {}
        opened: set[int] = set()
        generated = len(prior)
        last_flush = time.monotonic()
        left = job.sampling.max_tokens - len(prior)
        sampling = job.sampling.model_copy(
            update={"max_tokens": left, "min_tokens": max(0, job.sampling.min_tokens - len(prior))}
        )
        if left <= 0:  # the previous worker generated everything but died before the end
            reasons = ["length"] * n
        stream = (
            self._engine.generate(job.id, job.prompt_token_ids + prior, sampling) if left > 0 else _empty()
        )
        async for deltas in stream:
            self._metrics.generated(sum(len(d.token_ids) for d in deltas))
            urgent = False
            for d in deltas:
                pending.setdefault(d.index, _Pending()).add(d)
                generated += len(d.token_ids)
                if d.finish_reason is not None:
                    reasons[d.index] = d.finish_reason
                if d.index not in opened:  # a choice's first token goes out at once
                    opened.add(d.index)
                    urgent = True
            now = time.monotonic()
            if pending and (urgent or now - last_flush >= self._flush_interval) and None in reasons:
                await out.publish(out.tokens(pending))
                pending.clear()
                last_flush = now
        if any(r in (None, "abort") for r in reasons):
            raise EngineAborted("the engine stopped the request before it finished")
        final_reasons = tuple(r for r in reasons if r is not None)
        tail = out.tokens(pending)
        final = Final(
            seq=out.next_seq(),
            finish_reasons=final_reasons,
            usage=Usage(prompt_tokens=len(job.prompt_token_ids), completion_tokens=generated),
        )
        return tail, final

    async def fail(self, claim: Claim, out: ReplyChannel, status: int, code: str, message: str) -> None:
        self._metrics.outcome("failed")
        failure = Failure(seq=out.next_seq(), status=status, code=code, message=message)
        await self._finish(claim, out, [encode(failure)])

    async def _finish(self, claim: Claim, out: ReplyChannel, payloads: list[str]) -> None:
        """Publish the last replies and only then acknowledge, in one round trip."""
        await self._outbox.send(*(out.publish_command(p) for p in payloads), *self._ack(claim))

    async def acknowledge(self, claim: Claim) -> None:
        """End a job whose client gave up: nothing more to say."""
        self._metrics.outcome("cancelled")
        await self._outbox.send(*self._ack(claim))

    def _ack(self, claim: Claim) -> tuple[Command, ...]:
        """Finished jobs leave the stream too (so XLEN is the live backlog) and count as drained."""
        return (
            ("XACK", claim.stream, GROUP, claim.entry_id),
            ("XDEL", claim.stream, claim.entry_id),
            ("DEL", self._names.progress(claim.job.id)),
            ("INCR", self._names.drained(claim.job.model)),
        )

    async def hand_back(self, claim: Claim) -> None:
        """Re-queue a job this worker will not finish; its progress stays for the next worker."""
        self._metrics.outcome("handed_back")
        await self._outbox.send(
            ("XADD", claim.stream, "*", JOB_FIELD, encode(claim.job), HANDED_BACK_FIELD, "1"),
            ("XACK", claim.stream, GROUP, claim.entry_id),
            ("XDEL", claim.stream, claim.entry_id),
        )


async def _empty() -> AsyncIterator[list[Delta]]:
    return
    yield
