"""Runs one job on the engine and publishes its replies, coalesced, in order."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.messages import Failure, Final, FinishReason, Job, Started, Tokens, Usage, encode
from shared.names import GROUP, Names
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


class ReplyChannel:
    """Publishes one job's replies with consecutive sequence numbers."""

    def __init__(self, outbox: Outbox, channel: str, published: Callable[[], None]) -> None:
        self._outbox = outbox
        self.channel = channel
        self._published = published
        self._seq = 0

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

    async def publish(self, messages: list[Tokens]) -> None:
        await self._outbox.send(*(self.publish_command(encode(m)) for m in messages))


class JobRunner:
    def __init__(
        self,
        outbox: Outbox,
        names: Names,
        engine: Engine,
        worker_id: str,
        flush_interval: float,
        client_gone: Callable[[str], bool],
        metrics: WorkerMetrics,
    ) -> None:
        self._metrics = metrics
        self._client_gone = client_gone
        self._outbox = outbox
        self._names = names
        self._engine = engine
        self._worker_id = worker_id
        self._flush_interval = flush_interval

    async def run(self, claim: Claim) -> None:
        """Run the job to its end and acknowledge it. Raises only CancelledError."""
        job = claim.job
        out = ReplyChannel(self._outbox, self._names.reply_channel(job.id), self._metrics.published)
        try:
            if not await self._start(claim, out):
                await self.acknowledge(claim)
                return
            tail, final = await self._generate(job, out)
        except asyncio.CancelledError:
            # Either the client left (nothing more to say) or this worker is shutting down.
            if self._client_gone(job.id):
                await self.acknowledge(claim)
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

    async def _start(self, claim: Claim, out: ReplyChannel) -> bool:
        """Announce the job; False if its client already gave up."""
        started = Started(seq=out.next_seq(), worker=self._worker_id, attempt=claim.attempt)
        cancelled, _ = await self._outbox.send(
            ("EXISTS", self._names.cancelled(claim.job.id)), out.publish_command(encode(started))
        )
        return not cancelled

    async def _generate(self, job: Job, out: ReplyChannel) -> tuple[list[Tokens], Final]:
        n = job.sampling.n
        reasons: list[FinishReason | None] = [None] * n
        pending: dict[int, _Pending] = {}
        opened: set[int] = set()
        generated = 0
        last_flush = time.monotonic()
        async for deltas in self._engine.generate(job.id, job.prompt_token_ids, job.sampling):
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
        self._metrics.outcome("handed_back" if code == "worker_shutdown" else "failed")
        failure = Failure(seq=out.next_seq(), status=status, code=code, message=message)
        await self._finish(claim, out, [encode(failure)])

    async def _finish(self, claim: Claim, out: ReplyChannel, payloads: list[str]) -> None:
        """Publish the last replies and only then acknowledge, in one round trip."""
        await self._outbox.send(*(out.publish_command(p) for p in payloads), *_ack(claim))

    async def acknowledge(self, claim: Claim) -> None:
        """End a job whose client gave up (or whose claim moved on): nothing more to say."""
        self._metrics.outcome("cancelled")
        await self._outbox.send(*_ack(claim))


def _ack(claim: Claim) -> tuple[Command, Command]:
    """Finished jobs leave the stream too, so XLEN is the live backlog."""
    return ("XACK", claim.stream, GROUP, claim.entry_id), ("XDEL", claim.stream, claim.entry_id)
