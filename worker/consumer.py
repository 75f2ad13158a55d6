"""A worker's jobs from the queue to the end: read or taken over, run many at once, cancelled when
their client leaves, and drained on shutdown.

The parts live beside it: :mod:`worker.reader` (reading, fairly), :mod:`worker.claims` (keeping
claims fresh, taking over silent workers' jobs), :mod:`worker.cancels`, :mod:`worker.deadletter`
and :mod:`worker.runner` (one job).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.messages import DeadLetter, WireError, decode_job
from shared.names import HANDED_BACK_FIELD, JOB_FIELD, Names
from shared.settings import WorkerSettings
from worker.cancels import listen_for_cancels
from worker.channel import Claim, ClaimLost
from worker.claims import ClaimKeeper, Reclaimer
from worker.coalesce import flush_interval
from worker.deadletter import dead_letter, job_id_of, tell_client
from worker.engine import Engine
from worker.handover import hand_over, receive
from worker.inflight import Inflight
from worker.metrics import WorkerMetrics
from worker.outbox import Outbox
from worker.peers import Peers
from worker.prefill_gate import PrefillGate
from worker.prefix_affinity import hand_to
from worker.reader import Reader
from worker.runner import JobRunner
from worker.streams import JobStreams

log = logging.getLogger(__name__)

STOP_GRACE = 10.0
"""How long a stopping worker waits for cancelled jobs to hand themselves back."""
PEER_TTL_BEATS = 2.5
"""Heartbeat intervals after which a silent worker is no longer left a share of the jobs waiting."""


class Consumer:
    def __init__(
        self,
        redis: Redis,
        names: Names,
        settings: WorkerSettings,
        engine: Engine,
        worker_id: str,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._redis = redis
        self._names = names
        self._settings = settings
        self._worker_id = worker_id
        self._model = engine.model_name
        self.metrics = metrics or WorkerMetrics(self._model)
        self.inflight = Inflight(settings.capacity)
        self.stopping = asyncio.Event()
        self._streams = JobStreams(redis, names, self._model)
        self.outbox = Outbox(redis)
        self.runner = JobRunner(
            self.outbox,
            names,
            engine,
            worker_id,
            lambda: flush_interval(settings.flush_interval, settings.max_flush_interval, len(self.inflight)),
            stop_reason=self.inflight.stop_reason,
            stopping=self.stopping.is_set,
            metrics=self.metrics,
            gate=PrefillGate(settings.prefill_per_tenant),
        )
        self._peers = Peers(
            redis, names, self._model, worker_id, PEER_TTL_BEATS * settings.heartbeat_interval
        )
        self.reader = Reader(
            redis,
            settings.redis_url,
            worker_id,
            self._streams,
            self.inflight,
            settings.headroom_window,
            take=self.take,
            peers=self._peers,
            preempt=settings.preempt,
            resume=self.resume,
        )
        self._reclaimer = Reclaimer(
            redis, worker_id, self._streams, self.inflight, settings.reclaim_idle, take=self.take
        )

    def stop(self) -> None:
        """Stop taking jobs; running ones go on (see :meth:`drain`)."""
        self.stopping.set()

    async def read_loop(self) -> None:
        await self.reader.run(self.stopping)

    async def cancel_loop(self) -> None:
        await listen_for_cancels(self._redis, self._names, self.stopping, self.cancel)

    def cancel(self, job_id: str) -> None:
        if self.inflight.stop(job_id, "client"):
            return
        if (parked := self.inflight.unpark(job_id)) is not None:
            task = asyncio.create_task(self._drop(parked), name=f"drop-{job_id}")
            task.add_done_callback(_log_escaped)

    async def _drop(self, claim: Claim) -> None:
        with contextlib.suppress(ClaimLost, RedisError, OSError):  # then it is reclaimed, and ends there
            await self.runner.drop(claim)

    # -- starting a job --------------------------------------------------------------------------

    async def handover_loop(self) -> None:
        """Start the jobs other workers hand to this one (prefix affinity)."""
        await receive(self._redis, self._names, self._worker_id, self.stopping, self.take_handed)

    async def take_handed(self, stream: str, entry_id: str, fields: dict[bytes, bytes] | None) -> None:
        await self.take(stream, entry_id, fields, attempt=1, handed=True)

    async def take(
        self,
        stream: str,
        entry_id: str,
        fields: dict[bytes, bytes] | None,
        attempt: int,
        handed: bool = False,
    ) -> None:
        """Start the job of a stream entry this worker just read, took over or was handed (or refuse
        it, or hand it to the worker its prompt prefix belongs to)."""
        raw = (fields or {}).get(JOB_FIELD.encode())
        try:
            if raw is None:
                raise WireError("entry has no job field")
            job = decode_job(raw)
        except WireError as exc:
            log.error("dropping undecodable entry %s on %s: %s", entry_id, stream, exc)
            await self._dead_letter(stream, entry_id, raw, str(exc))
            if (job_id := job_id_of(raw)) is not None:  # e.g. a newer gateway's job: say so at once
                message = f"the worker could not read the job (is it of an older release?): {exc}"
                await tell_client(self._redis, self._names, job_id, message[:500], code="unreadable_job")
            return
        held = self.inflight.claim(job.id)
        if held is not None and held.entry_id == entry_id:
            # XAUTOCLAIM handed this worker its own entry back (its claim went idle while the event
            # loop stalled): the job is running here already and must not start twice.
            log.warning("job %s: claim went stale on its own worker (event loop stalled?)", job.id)
            return
        handed_back = bool((fields or {}).get(HANDED_BACK_FIELD.encode()))
        claim = Claim(stream=stream, entry_id=entry_id, job=job, attempt=attempt, handed_back=handed_back)
        if self.stopping.is_set():
            # Read or reclaimed while stopping (e.g. a job this worker just handed back): starting it
            # now would only hand it back again, or outlive the engine.
            log.info("returning job %s, not started, to the queue", job.id)
            with contextlib.suppress(ClaimLost):  # taken over meanwhile: the new owner has it
                await self.runner.hand_back(claim, started=False)
            return
        if attempt > self._settings.max_deliveries:
            await self._dead_letter(stream, entry_id, raw, f"delivered {attempt - 1} times")
            await tell_client(self._redis, self._names, job.id)
            return
        if not handed and await self._hand_over(claim):
            return
        task = asyncio.create_task(self._run(claim), name=f"job-{job.id}")
        task.add_done_callback(_log_escaped)
        self.inflight.add(claim, task)

    def resume(self, claim: Claim) -> None:
        """Resume a job parked to make room for another tenant's (see :mod:`worker.preempt`)."""
        task = asyncio.create_task(self._run(claim), name=f"job-{claim.job.id}")
        task.add_done_callback(_log_escaped)
        self.inflight.add(claim, task)

    async def _hand_over(self, claim: Claim) -> bool:
        """Hand a new job to the worker its prompt prefix belongs to, if that one has room; False
        to run it here (see :mod:`worker.prefix_affinity`)."""
        digest = claim.job.affinity
        if not (self._settings.prefix_affinity and digest and claim.attempt == 1 and not claim.handed_back):
            return False
        try:
            peers = await self._peers.loads()
        except (RedisError, OSError) as exc:
            log.warning("cannot read the other workers (%s): job %s runs here", exc, claim.job.id)
            return False
        target = hand_to(digest, self._worker_id, len(self.inflight), peers)
        if target is None:
            return False
        try:
            streams = await self._streams.current()
            entry = (claim.stream, claim.entry_id)
            handed = await hand_over(self.outbox, self._names, entry, streams, target, self._worker_id)
        except (RedisError, OSError) as exc:
            log.warning("could not hand job %s to %s (%s); running it here", claim.job.id, target.id, exc)
            return False
        if handed:
            self.metrics.handed_over()
        return handed

    async def _run(self, claim: Claim) -> None:
        self.metrics.job_started(claim.job)
        ended = False
        try:
            await self.runner.run(claim)
            ended = True  # to its end, even if preempted as it ended: nothing to resume
        finally:
            self.metrics.job_left()
            self.inflight.remove(claim.job.id, ended=ended)
            self.reader.wake()

    async def _dead_letter(self, stream: str, entry_id: str, raw: bytes | None, reason: str) -> None:
        self.metrics.outcome("dead_lettered")
        job = raw.decode(errors="replace") if raw else ""
        letter = DeadLetter(stream=stream, entry=entry_id, reason=reason, job=job)
        await dead_letter(self._redis, self._names, self._model, letter)

    # -- claims ----------------------------------------------------------------------------------

    async def claims_loop(self) -> None:
        """Keep this worker's claims fresh (from a thread, see :class:`~worker.claims.ClaimKeeper`)
        and take over jobs whose worker went silent. Runs until cancelled, after draining: the
        claims of jobs finishing during the drain must stay fresh too."""
        period = min(self._settings.heartbeat_interval, self._settings.reclaim_idle / 3)
        keeper = ClaimKeeper(
            self._settings.redis_url,
            self._worker_id,
            self.inflight,
            self._settings.reclaim_idle,
            period,
            lost=self._drop_lost,
        )
        keeper.start()
        try:
            while True:
                if not self.stopping.is_set():
                    try:
                        await self._reclaimer.reclaim()
                    except (RedisError, OSError) as exc:
                        self._streams.recheck(exc)
                        log.warning("taking over abandoned jobs failed: %s", exc)
                await asyncio.sleep(period)
        finally:
            keeper.stop()

    async def reclaim(self) -> None:
        await self._reclaimer.reclaim()

    def _drop_lost(self, stream: str, entry_id: str) -> None:
        """Another worker owns this job now; running it here too would duplicate its output."""
        job_id = self.inflight.stop_entry(stream, entry_id, "lost")  # stop quietly: the new owner answers
        if job_id is not None:
            log.warning("job %s was taken over by another worker; stopping it here", job_id)

    # -- shutdown --------------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Let running jobs finish for up to ``grace`` s, then stop the rest: single-choice jobs are
        handed back (another worker resumes them), others end with an error to their client."""
        for claim in self.inflight.parked():  # another worker resumes them from their progress
            self.inflight.unpark(claim.job.id)
            with contextlib.suppress(ClaimLost, RedisError, OSError):  # else reclaimed after reclaim_idle
                await self.runner.hand_back(claim, started=False)
        if self.inflight:
            log.info("waiting up to %.0fs for %d running jobs", grace, len(self.inflight))
        deadline = time.monotonic() + grace
        while self.inflight and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(self.inflight.tasks(), timeout=left)
        late = self.inflight.tasks()
        for task in late:
            task.cancel()
        if late:
            _, stuck = await asyncio.wait(late, timeout=STOP_GRACE)
            for task in stuck:  # never hang the exit: their entries stay pending and are reclaimed
                trace = io.StringIO()
                task.print_stack(file=trace)
                log.error("job task did not stop within %.0fs:\n%s", STOP_GRACE, trace.getvalue())


def _log_escaped(task: asyncio.Task[None]) -> None:
    """A job task ends by returning or by cancellation; anything else escaped the runner: log it."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("job task %s failed", task.get_name(), exc_info=exc)
