"""Runs one job on the engine and publishes its replies, coalesced, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from shared.messages import Failure, Final, FinishReason, Job, Started, Tokens, Usage, encode
from shared.names import GROUP, HANDED_BACK_FIELD, JOB_FIELD, Names
from worker.engine import Delta, Engine, EngineRejected
from worker.metrics import WorkerMetrics
from worker.outbox import Command, Outbox

log = logging.getLogger(__name__)

Reply = Started | Tokens | Final | Failure


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


# Every write a worker makes for a job goes through one of these scripts, which first check that
# the worker still owns the job's stream entry. A worker that stalled past the reclaim idle time and
# lost the job to another is thereby fenced off: none of its late replies reach the client next to
# the new owner's, and the zero it gets back tells it to stop.
_OWNS = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
"""

# Publish replies, recording each token batch in the job's progress list (so the progress a
# successor resumes from is exactly what the client was sent); with 'ack', then end the job: XACK,
# XDEL (XLEN stays the live backlog), drop the progress, count it as drained.
# KEYS: job stream, progress list, drained counter.
# ARGV: group, consumer, entry id, channel, progress ttl ms, 'ack' or '', then pairs of
# (payload, progress entry or '').
CLAIMED_PUBLISH = (
    _OWNS
    + """
for i = 7, #ARGV, 2 do
  if ARGV[i + 1] ~= '' then
    redis.call('RPUSH', KEYS[2], ARGV[i + 1])
    redis.call('PEXPIRE', KEYS[2], ARGV[5])
  end
  redis.call('PUBLISH', ARGV[4], ARGV[i])
end
if ARGV[6] == 'ack' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  redis.call('XDEL', KEYS[1], ARGV[3])
  redis.call('DEL', KEYS[2])
  redis.call('INCR', KEYS[3])
end
return 1
"""
)

# Re-queue a job this worker will not finish, as a new entry marked handed back; its progress stays
# for the next worker. KEYS: job stream. ARGV: group, consumer, entry id, job field, job,
# handed-back field.
CLAIMED_HAND_BACK = (
    _OWNS
    + """
redis.call('XADD', KEYS[1], '*', ARGV[4], ARGV[5], ARGV[6], '1')
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)
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


class ClaimLost(RuntimeError):
    """Another worker took the job over; this one must stop without a word (the new owner answers)."""


class ReplyChannel:
    """Publishes one job's replies with consecutive sequence numbers, while this worker owns the job.

    With ``record_progress`` every token batch is also recorded (single-choice jobs only: several
    choices cannot be resumed one by one), which lets another worker resume the stream exactly.
    """

    def __init__(
        self,
        outbox: Outbox,
        names: Names,
        claim: Claim,
        worker_id: str,
        published: Callable[[], None],
        record_progress: bool,
        first_seq: int = 0,
    ) -> None:
        job = claim.job
        self._outbox = outbox
        self._published = published
        self._record = record_progress
        self._seq = first_seq
        self._keys = (claim.stream, names.progress(job.id), names.drained(job.model))
        self._owner = (GROUP, worker_id, claim.entry_id)
        self._channel = names.reply_channel(job.id)

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

    def command(self, messages: Sequence[Reply], ack: bool = False) -> Command:
        """Publish ``messages`` (and, with ``ack``, end the job) if this worker still owns it."""
        pairs: list[str] = []
        for message in messages:
            self._published()
            entry = ""
            if self._record and isinstance(message, Tokens):
                entry = json.dumps({"s": message.seq, "t": message.token_ids}, separators=(",", ":"))
            pairs += (encode(message), entry)
        return (
            "EVAL",
            CLAIMED_PUBLISH,
            len(self._keys),
            *self._keys,
            *self._owner,
            self._channel,
            PROGRESS_TTL_MS,
            "ack" if ack else "",
            *pairs,
        )

    async def send(self, messages: Sequence[Reply], ack: bool = False) -> None:
        (owned,) = await self._outbox.send(self.command(messages, ack))
        if not owned:
            raise ClaimLost


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
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self._metrics = metrics
        self._stop_reason = stop_reason
        self._stopping = stopping
        self._outbox = outbox
        self._names = names
        self._engine = engine
        self._worker_id = worker_id
        self._flush_interval = flush_interval

    async def run(self, claim: Claim) -> None:
        """Run the job to its end and acknowledge it. Raises only CancelledError."""
        try:
            await self._run(claim)
        except ClaimLost:
            log.warning("job %s was taken over by another worker; stopping it here", claim.job.id)
            self._metrics.outcome("taken_over")

    async def _run(self, claim: Claim) -> None:
        job = claim.job
        progress = await self._progress(claim)
        out = ReplyChannel(
            self._outbox,
            self._names,
            claim,
            self._worker_id,
            self._metrics.published,
            record_progress=job.sampling.n == 1,
            first_seq=progress.last_seq + 1 if progress else 0,
        )
        try:
            if not await self._start(out, claim, progress):
                await self.acknowledge(out)
                return
            tail, final = await self._generate(job, out, progress.token_ids if progress else ())
        except asyncio.CancelledError:
            # The client left (nothing more to say), or this worker is shutting down: hand the job
            # back when it can be resumed elsewhere, else tell the client.
            reason = self._stop_reason(job.id)
            with contextlib.suppress(ClaimLost):  # taken over meanwhile: the new owner answers
                if reason == "lost":
                    # another worker owns the job now: its entry and progress are not ours to touch
                    self._metrics.outcome("taken_over")
                elif reason == "client":
                    await self.acknowledge(out)
                elif job.sampling.n == 1:
                    await self.hand_back(claim)
                else:
                    await self.fail(out, 503, "worker_shutdown", "the worker stopped before the job finished")
            raise
        except EngineRejected as exc:
            await self.fail(out, 400, "invalid_request", str(exc))
            return
        except ClaimLost:
            raise
        except Exception as exc:
            if self._stopping() and job.sampling.n == 1:
                # The engine went down with the worker (a signal to the whole process group, as
                # systemd or a terminal's Ctrl-C send): another worker can still finish the job.
                log.warning("job %s: engine stopped during shutdown (%s)", job.id, type(exc).__name__)
                await self.hand_back(claim)
                return
            if isinstance(exc, EngineAborted):
                await self.fail(out, 503, "engine_aborted", str(exc))
                return
            # the client must hear of any failure: log it and report it
            log.exception("job %s failed", job.id)
            await self.fail(out, 500, "engine_error", f"generation failed: {type(exc).__name__}")
            return
        await out.send([*tail, final], ack=True)  # the last replies, then the acknowledgement
        self._metrics.outcome("completed")

    async def _progress(self, claim: Claim) -> Progress | None:
        """What an earlier attempt published, when this is a retry or a hand-back."""
        if claim.attempt <= 1 and not claim.handed_back:
            return None
        (entries,) = await self._outbox.send(("LRANGE", self._names.progress(claim.job.id), 0, -1))
        return Progress.parse(entries)

    async def _start(self, out: ReplyChannel, claim: Claim, progress: Progress | None) -> bool:
        """Announce the job; False if its client already gave up."""
        resumed = len(progress.token_ids) if progress else 0
        started = Started(
            seq=out.next_seq(), worker=self._worker_id, attempt=claim.attempt, resumed_tokens=resumed
        )
        cancelled, owned = await self._outbox.send(
            ("EXISTS", self._names.cancelled(claim.job.id)), out.command([started])
        )
        if not owned:
            raise ClaimLost
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
        async with contextlib.aclosing(stream):  # leaving early (e.g. ClaimLost) aborts the request
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
                    await out.send(out.tokens(pending))
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

    async def fail(self, out: ReplyChannel, status: int, code: str, message: str) -> None:
        self._metrics.outcome("failed")
        await out.send([Failure(seq=out.next_seq(), status=status, code=code, message=message)], ack=True)

    async def acknowledge(self, out: ReplyChannel) -> None:
        """End a job whose client gave up: nothing more to say."""
        self._metrics.outcome("cancelled")
        await out.send([], ack=True)

    async def hand_back(self, claim: Claim, started: bool = True) -> None:
        """Re-queue a job this worker will not finish; its progress stays for the next worker."""
        if started:
            log.info("handing job %s back to the queue", claim.job.id)
        self._metrics.outcome("handed_back")
        (owned,) = await self._outbox.send(
            (
                "EVAL",
                CLAIMED_HAND_BACK,
                1,
                claim.stream,
                GROUP,
                self._worker_id,
                claim.entry_id,
                JOB_FIELD,
                encode(claim.job),
                HANDED_BACK_FIELD,
            )
        )
        if not owned:
            raise ClaimLost


async def _empty() -> AsyncGenerator[list[Delta]]:
    return
    yield
