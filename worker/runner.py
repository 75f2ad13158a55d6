"""Runs one job on the engine and publishes its replies, coalesced, in order.

The decisions live in pure functions (:mod:`worker.coalesce` for what goes out when,
:mod:`worker.outcome` for a job that ends early); this module does the I/O around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable

from shared.messages import STOPPED, Failure, Final, Job, Started, Usage, encode
from shared.names import GROUP, HANDED_BACK_FIELD, JOB_FIELD, Names
from shared.scripts import CLAIMED_HAND_BACK
from worker.channel import Claim, ClaimLost, NobodyListening, Progress, ReplyChannel, check
from worker.coalesce import Coalescer, resumed
from worker.embedding import embed
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.outbox import Outbox
from worker.outcome import Action, StopReason, early_end
from worker.prefill_gate import PrefillGate

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(
        self,
        outbox: Outbox,
        names: Names,
        engine: Engine,
        worker_id: str,
        flush_interval: Callable[[], float],
        stop_reason: Callable[[str], StopReason | None],
        metrics: WorkerMetrics,
        stopping: Callable[[], bool] = lambda: False,
        gate: PrefillGate | None = None,
    ) -> None:
        self._gate = gate or PrefillGate(0)
        self._metrics = metrics
        self._stop_reason = stop_reason
        self._stopping = stopping
        self._outbox = outbox
        self._names = names
        self._engine = engine
        self._worker_id = worker_id
        self._flush_interval = flush_interval
        self._resumes = itertools.count(1)

    async def run(self, claim: Claim) -> None:
        """Run the job to its end and acknowledge it. Raises only CancelledError."""
        try:
            await self._run(claim)
        except ClaimLost:
            log.warning("job %s was taken over by another worker; stopping it here", claim.job.id)
            self._metrics.outcome("taken_over")
        except NobodyListening:
            # Like a client that disconnected, but its gateway could not say so (it died, or lost
            # Redis): the engine's time goes to jobs someone waits for.
            log.info("job %s: nobody listens for its replies any more; stopping it", claim.job.id)
            with contextlib.suppress(ClaimLost):
                await self._abandon(claim)

    async def _run(self, claim: Claim) -> None:
        job = claim.job
        progress = await self._progress(claim)
        out = ReplyChannel(
            self._outbox,
            self._names,
            claim,
            self._worker_id,
            self._metrics.published,
            fresh=progress is None,
            first_seq=progress.last_seq + 1 if progress else 0,
        )
        try:
            if not await self._start(out, claim, progress):
                await self.acknowledge(out)
                return
            if (wrong := self._wrong_kind(job)) is not None:
                await self.fail(out, 400, "invalid_request", wrong)
            elif job.embed is not None:
                await embed(self._engine, job, out)
                self._metrics.outcome("completed")
            else:
                await self._generate(job, out, progress.token_ids if progress else ())
        except (ClaimLost, NobodyListening):
            raise
        except asyncio.CancelledError as exc:
            with contextlib.suppress(ClaimLost):  # taken over meanwhile: the new owner answers
                await self._end_early(claim, out, exc)
            raise
        except Exception as exc:
            await self._end_early(claim, out, exc)

    def _wrong_kind(self, job: Job) -> str | None:
        """Why this worker's model cannot run the job (an embedding job for a model that generates,
        or the other way round: workers of one served name that serve different models), or None."""
        embeds = self._engine.embedding is not None
        if (job.embed is not None) == embeds:
            return None
        what = "an embedding model" if embeds else "a model that generates text"
        return f"the worker that took this job serves '{job.model}' as {what}"

    async def _end_early(self, claim: Claim, out: ReplyChannel, error: BaseException) -> None:
        action = early_end(error, self._stop_reason(claim.job.id), claim.job.sampling.n, self._stopping())
        if action.unexpected:  # the client hears of it below; the traceback goes to the log
            log.error("job %s failed", claim.job.id, exc_info=error)
        elif action.kind == "hand_back" and not isinstance(error, asyncio.CancelledError):
            log.warning("job %s: engine stopped during shutdown (%s)", claim.job.id, type(error).__name__)
        await self._act(action, claim, out)

    async def _act(self, action: Action, claim: Claim, out: ReplyChannel) -> None:
        if action.kind == "nothing":  # another worker owns the job: its entry is not ours to touch
            self._metrics.outcome("taken_over")
        elif action.kind == "acknowledge":
            await self.acknowledge(out)
        elif action.kind == "hand_back":
            await self.hand_back(claim)
        elif action.kind == "park":  # its entry stays this worker's; it resumes from its progress
            self._metrics.outcome("preempted")
        else:
            await self.fail(out, action.status, action.code, action.message)

    async def _progress(self, claim: Claim) -> Progress | None:
        """What an earlier attempt published, when this is a retry or a hand-back of a job that can
        resume: one choice, no grammar (the engine's grammar would start over mid-answer), so
        the others start over."""
        sampling = claim.job.sampling
        if (claim.attempt <= 1 and not claim.handed_back) or sampling.n > 1 or sampling.constrained:
            return None
        (entries,) = await self._outbox.send(("LRANGE", self._names.progress(claim.job.id), 0, -1))
        return Progress.parse(entries)

    async def _start(self, out: ReplyChannel, claim: Claim, progress: Progress | None) -> bool:
        """Announce the job; False if its client already gave up."""
        resumed_tokens = len(progress.token_ids) if progress else 0
        started = Started(
            seq=out.next_seq(), worker=self._worker_id, attempt=claim.attempt, resumed_tokens=resumed_tokens
        )
        cancelled, result = await self._outbox.send(
            ("EXISTS", self._names.cancelled(claim.job.id)), out.command([started])
        )
        if cancelled:
            return False
        check(result)
        return True

    async def _generate(self, job: Job, out: ReplyChannel, prior: tuple[int, ...]) -> None:
        """Generate (continuing after ``prior`` tokens, if any), publish, and end the job."""
        coalescer = Coalescer(job.sampling.n, time.monotonic(), prior=len(prior))
        sampling = resumed(job.sampling, len(prior))
        if sampling is None:  # the previous worker generated everything but died before the end
            coalescer.finish_all("length")
        else:
            # Its prompt's turn to enter the engine (see worker.prefill_gate).
            async with self._gate.job(job.tenant, sampling.max_tokens) as entry:
                stream = self._engine.generate(
                    # A job resumed on this worker (parked, see worker.preempt) may start again
                    # before the engine has let go of its aborted request: never reuse that id.
                    f"{job.id}.{next(self._resumes)}" if prior else job.id,
                    job.prompt_token_ids + prior,
                    sampling,
                    reasoning_ended=job.reasoning_ended,
                    cache_salt=job.cache_salt,
                )
                async with contextlib.aclosing(stream):  # leaving early (e.g. ClaimLost) aborts it
                    async for deltas in stream:
                        entry.prefilled()
                        chunks = coalescer.add(deltas, time.monotonic(), self._flush_interval())
                        if chunks:
                            self._metrics.generated(sum(len(c.ids) for c in chunks))
                            await out.send(out.tokens(chunks))
                entry.finished((coalescer.generated - len(prior)) / sampling.n)
        ending = coalescer.end()
        self._metrics.generated(sum(len(c.ids) for c in ending.tail))
        tail = out.tokens(ending.tail)
        final = Final(
            seq=out.next_seq(),
            finish_reasons=ending.finish_reasons,
            usage=Usage(prompt_tokens=len(job.prompt_token_ids), completion_tokens=ending.generated),
        )
        await out.send([*tail, final], ack=True)  # the last replies, then the acknowledgement
        self._metrics.outcome("completed")

    async def fail(self, out: ReplyChannel, status: int, code: str, message: str) -> None:
        self._metrics.outcome("failed")
        await out.send([Failure(seq=out.next_seq(), status=status, code=code, message=message)], ack=True)

    async def acknowledge(self, out: ReplyChannel) -> None:
        """End a job whose client gave up. That client hears nothing more, but another may still
        follow the job (one that took its stream up, a retry under the same key): it learns at
        once that the job stopped, rather than wait for replies that will not come."""
        self._metrics.outcome("cancelled")
        await out.send([STOPPED.model_copy(update={"seq": out.next_seq()})], ack=True)

    async def drop(self, claim: Claim) -> None:
        """End a parked job whose client gave up (it has no task to do so)."""
        await self._end_quietly(claim, "cancelled")

    async def _abandon(self, claim: Claim) -> None:
        """End a job nobody listens to any more, without a word (there is no one to say it to)."""
        await self._end_quietly(claim, "abandoned")

    async def _end_quietly(self, claim: Claim, outcome: str) -> None:
        """Acknowledge a job that has no reply channel open, publishing nothing."""
        self._metrics.outcome(outcome)
        out = ReplyChannel(self._outbox, self._names, claim, self._worker_id, lambda _: None, fresh=False)
        await out.send([], ack=True)

    async def hand_back(self, claim: Claim, started: bool = True) -> None:
        """Re-queue a job this worker will not finish; its progress stays for the next worker."""
        if started:
            log.info("handing job %s back to the queue", claim.job.id)
        self._metrics.outcome("handed_back")
        keys = (claim.stream,)
        args = (GROUP, self._worker_id, claim.entry_id, JOB_FIELD, encode(claim.job), HANDED_BACK_FIELD)
        (owned,) = await self._outbox.send(CLAIMED_HAND_BACK.call(keys, args))
        if not owned:
            raise ClaimLost
