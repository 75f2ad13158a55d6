"""Pulls jobs from every tenant stream of the worker's model and runs many at once.

Reading stops while the worker is at capacity, so jobs wait in Redis (visible to ``XLEN``) rather
than in a worker's memory, and any worker with room can take them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared.messages import Failure, WireError, decode_job, encode
from shared.names import GROUP, HANDED_BACK_FIELD, JOB_FIELD, Names
from shared.scripts import REFRESH_CLAIMS
from shared.settings import WorkerSettings
from shared.tenants import PRIORITY_WEIGHT
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.outbox import Outbox
from worker.runner import Claim, ClaimLost, JobRunner, StopReason

log = logging.getLogger(__name__)

READ_BLOCK_MS = 250
READ_BATCH = 8
"""Most jobs one read takes from a stream: a burst is spread over every idle worker instead of
going whole to whichever worker reads first."""
STOP_GRACE = 10.0
"""How long a stopping worker waits for cancelled jobs to hand themselves back."""
STREAMS_REFRESH = 0.25
"""How stale a worker's list of job streams may be: a new tenant's first job waits at most this."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
        self.inflight: dict[str, tuple[asyncio.Task[None], Claim]] = {}
        self._stopped: dict[str, StopReason] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._stopping = asyncio.Event()
        self._streams: list[str] = []
        self._weights: dict[str, int] = {}
        self._streams_at = float("-inf")
        self._plan = ReadPlan()
        self._headroom = Headroom(settings.headroom_window, settings.capacity)
        self._finished = asyncio.Event()
        self._blocking = redis
        self._blocked_id: int | None = None
        self._wakers: set[asyncio.Task[None]] = set()
        self.outbox = Outbox(redis)
        self.runner = JobRunner(
            self.outbox,
            names,
            engine,
            worker_id,
            settings.flush_interval,
            stop_reason=self.stop_reason,
            stopping=self._stopping.is_set,
            metrics=self.metrics,
        )

    def stop_reason(self, job_id: str) -> StopReason | None:
        """Why a job's task was cancelled (None: the worker is shutting down)."""
        return self._stopped.get(job_id)

    def stop(self) -> None:
        """Stop taking jobs; running ones go on (see :meth:`drain`)."""
        self._stopping.set()

    # -- reading ---------------------------------------------------------------------------------

    async def read_loop(self) -> None:
        # Blocking reads while a stream is held back (see _read_once) use a connection of their
        # own, which a job that ends can wake with CLIENT UNBLOCK.
        self._blocking = Redis.from_url(self._settings.redis_url, single_connection_client=True)
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                await self._room.wait()
                try:
                    await self._read_once()
                    backoff = 0.1
                except (RedisError, OSError) as exc:
                    self._recheck_groups(exc)
                    log.warning("reading jobs failed (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await self._blocking.aclose()

    async def _read_once(self) -> None:
        streams = await self._job_streams()
        free = self._settings.capacity - len(self.inflight)
        held = Counter(claim.stream for _, claim in self.inflight.values())
        self._headroom.update(held, time.monotonic())
        rooms = self._headroom.room(streams, held, free, self._weights)
        if not rooms:  # no tenants yet, or the free slots are kept for tenants not sending right now
            self._finished.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), READ_BLOCK_MS / 1000)
            return
        weights = {s: self._weights.get(s, 1) for s in rooms}
        reads = within(self._plan.plan(weights, max(rooms.values())), rooms)
        if len(rooms) == len(streams):
            entries = await read_fairly(self._redis, self._worker_id, reads, list(weights))
        else:
            # A stream held back by the headroom regains room when one of its jobs ends, which a
            # read blocked on the other streams would not notice: the job's end unblocks it.
            self._blocked_id = await self._blocking.client_id()
            try:
                entries = await read_fairly(
                    self._redis, self._worker_id, reads, list(weights), blocking=self._blocking
                )
            finally:
                self._blocked_id = None
        for stream, entry_id, fields in entries:
            await self._take(stream, entry_id, fields, attempt=1)

    def _wake_reader(self) -> None:
        """Cut short a read blocked while some stream was held back (a slot just freed up)."""
        if self._blocked_id is None or self._stopping.is_set():
            return

        async def unblock(client_id: int) -> None:
            with contextlib.suppress(RedisError, OSError):  # the read then just times out
                await self._redis.client_unblock(client_id)

        task = asyncio.create_task(unblock(self._blocked_id))
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    def _recheck_groups(self, exc: BaseException) -> None:
        """After a command error, ensure every stream's group again on the next read.

        Almost always the error is NOGROUP (Redis restarted without its data). The text cannot tell:
        redis-py 6 replaces a pipelined command's error message with a template, so any error reply
        counts; creating a group that exists is a no-op (BUSYGROUP).
        """
        if isinstance(exc, ResponseError):
            self._streams_at = float("-inf")

    async def _job_streams(self) -> list[str]:
        """Every job stream of this model, with the consumer group ensured on new ones."""
        now = time.monotonic()
        if now - self._streams_at < STREAMS_REFRESH:
            return self._streams
        index = await self._redis.hgetall(self._names.streams_index(self._model))  # type: ignore[misc]
        self._weights = {_text(s): PRIORITY_WEIGHT.get(_text(p), 1) for s, p in index.items()}
        streams = sorted(self._weights)
        for stream in set(streams) - set(self._streams) if self._streams_at > float("-inf") else streams:
            await self._ensure_group(stream)
        self._streams, self._streams_at = streams, now
        return streams

    async def _ensure_group(self, stream: str) -> None:
        try:
            # From id 0: jobs enqueued before the group existed must not be skipped.
            await self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _take(
        self, stream: str, entry_id: str, fields: dict[bytes, bytes] | None, attempt: int
    ) -> None:
        raw = (fields or {}).get(JOB_FIELD.encode())
        try:
            if raw is None:
                raise WireError("entry has no job field")
            job = decode_job(raw)
        except WireError as exc:
            log.error("dropping undecodable entry %s on %s: %s", entry_id, stream, exc)
            await self._dead_letter(stream, entry_id, raw, reason=str(exc))
            return
        held = self.inflight.get(job.id)
        if held is not None and held[1].entry_id == entry_id:
            # XAUTOCLAIM handed this worker its own entry back (its claim went idle while the event
            # loop stalled): the job is running here already and must not start twice.
            log.warning("job %s: claim went stale on its own worker (event loop stalled?)", job.id)
            return
        handed_back = bool((fields or {}).get(HANDED_BACK_FIELD.encode()))
        claim = Claim(stream=stream, entry_id=entry_id, job=job, attempt=attempt, handed_back=handed_back)
        if self._stopping.is_set():
            # Read or reclaimed while stopping (e.g. a job this worker just handed back): starting it
            # now would only hand it back again, or outlive the engine.
            log.info("returning job %s, not started, to the queue", job.id)
            with contextlib.suppress(ClaimLost):  # taken over meanwhile: the new owner has it
                await self.runner.hand_back(claim, started=False)
            return
        if attempt > self._settings.max_deliveries:
            await self._dead_letter(stream, entry_id, raw, reason=f"delivered {attempt - 1} times")
            failure = Failure(
                seq=0, status=500, code="job_failed", message="the job failed on every worker that tried it"
            )
            await self._redis.publish(self._names.reply_channel(job.id), encode(failure))
            return
        task = asyncio.create_task(self._run(claim), name=f"job-{job.id}")
        self.inflight[job.id] = (task, claim)
        if len(self.inflight) >= self._settings.capacity:
            self._room.clear()

    async def _run(self, claim: Claim) -> None:
        self.metrics.job_started(claim.job)
        try:
            await self.runner.run(claim)
        finally:
            self.metrics.job_left()
            self.inflight.pop(claim.job.id, None)
            self._stopped.pop(claim.job.id, None)
            self._room.set()
            self._finished.set()
            self._wake_reader()

    async def _dead_letter(self, stream: str, entry_id: str, raw: bytes | None, reason: str) -> None:
        self.metrics.outcome("dead_lettered")
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(
                self._names.dead_letter(self._model),
                {"stream": stream, "entry": entry_id, "reason": reason, JOB_FIELD: raw or b""},
            )
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    # -- claims ----------------------------------------------------------------------------------

    async def claims_loop(self) -> None:
        """Keep this worker's claims fresh (from a thread of its own, see :class:`ClaimKeeper`) and
        take over jobs whose worker went silent. Runs until cancelled, after draining: the claims
        of jobs finishing during the drain must stay fresh too."""
        period = min(self._settings.heartbeat_interval, self._settings.reclaim_idle / 3)
        keeper = ClaimKeeper(self, period)
        keeper.start()
        try:
            while True:
                if not self._stopping.is_set():
                    try:
                        await self.reclaim()
                    except (RedisError, OSError) as exc:
                        self._recheck_groups(exc)
                        log.warning("taking over abandoned jobs failed: %s", exc)
                await asyncio.sleep(period)
        finally:
            keeper.stop()

    def _drop_lost(self, stream: str, entry_id: str) -> None:
        """Another worker owns this job now; running it here too would duplicate its output."""
        for task, claim in list(self.inflight.values()):
            if claim.stream == stream and claim.entry_id == entry_id:
                log.warning("job %s was taken over by another worker; stopping it here", claim.job.id)
                self._stopped[claim.job.id] = "lost"  # stop quietly: the new owner answers
                task.cancel()

    async def reclaim(self) -> None:
        idle_ms = int(self._settings.reclaim_idle * 1000)
        for stream in await self._job_streams():
            free = self._settings.capacity - len(self.inflight)
            if free <= 0:
                return
            reply = await self._redis.xautoclaim(stream, GROUP, self._worker_id, idle_ms, "0-0", count=free)
            for entry_id, fields in _claimed_entries(reply):
                delivered = await self._deliveries(stream, entry_id)
                log.info("took over job entry %s on %s (delivery %d)", entry_id, stream, delivered)
                await self._take(stream, entry_id, fields, attempt=delivered)

    async def _deliveries(self, stream: str, entry_id: str) -> int:
        rows = await self._redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    # -- cancellation ----------------------------------------------------------------------------

    async def cancel_loop(self) -> None:
        """Abort jobs whose clients disconnected (the gateway announces them on one channel)."""
        while not self._stopping.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._names.cancel_channel())
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self.cancel(_text(message["data"]))
            except (RedisError, OSError) as exc:
                log.warning("cancel channel lost: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()

    def cancel(self, job_id: str) -> None:
        held = self.inflight.get(job_id)
        if held is not None:
            self._stopped[job_id] = "client"
            held[0].cancel()

    # -- shutdown --------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Let running jobs finish for up to ``timeout`` s, then stop the rest: single-choice jobs are
        handed back (another worker resumes them), others end with an error to their client."""
        if self.inflight:
            log.info("waiting up to %.0fs for %d running jobs", timeout, len(self.inflight))
        deadline = time.monotonic() + timeout
        while self.inflight and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait([t for t, _ in self.inflight.values()], timeout=left)
        late = [t for t, _ in self.inflight.values()]
        for task in late:
            task.cancel()
        if late:
            _, stuck = await asyncio.wait(late, timeout=STOP_GRACE)
            for task in stuck:  # never hang the exit: their entries stay pending and are reclaimed
                trace = io.StringIO()
                task.print_stack(file=trace)
                log.error("job task did not stop within %.0fs:\n%s", STOP_GRACE, trace.getvalue())


class ClaimKeeper(threading.Thread):
    """Refreshes a worker's claims from a thread with its own Redis connection.

    A claim left idle for ``reclaim_idle`` is taken over by another worker, so refreshing it must not
    wait for the event loop: with many streams on a host short of CPU one turn of the loop can take
    seconds, and a live worker would lose its jobs (they would stay correct, the writes being
    fenced, but be redone elsewhere). The thread needs the GIL only for a moment each period.
    """

    def __init__(self, consumer: Consumer, period: float) -> None:
        super().__init__(name="claim-keeper", daemon=True)
        self._consumer = consumer
        self._period = period
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        consumer = self._consumer
        idle = consumer._settings.reclaim_idle
        redis = SyncRedis.from_url(consumer._settings.redis_url, socket_timeout=max(1.0, idle / 3))
        refresh = redis.register_script(REFRESH_CLAIMS)
        refreshed = time.monotonic()
        try:
            while not self._stop.wait(self._period):
                late = time.monotonic() - refreshed
                if late > idle / 2:  # the whole process is starved: its jobs are about to move
                    log.warning("claims refreshed after %.1fs (reclaim idle %.0fs): short of CPU", late, idle)
                by_stream: dict[str, list[str]] = {}
                for _, claim in list(consumer.inflight.values()):  # one C-level copy, under the GIL
                    by_stream.setdefault(claim.stream, []).append(claim.entry_id)
                try:
                    for stream, ids in by_stream.items():
                        lost = refresh(keys=[stream, GROUP], args=[consumer._worker_id, *ids])
                        for entry_id in lost:
                            self._loop.call_soon_threadsafe(consumer._drop_lost, stream, _text(entry_id))
                    refreshed = time.monotonic()
                except (RedisError, OSError) as exc:
                    log.warning("refreshing claims failed: %s", exc)
                except RuntimeError:  # the event loop closed: the worker is gone
                    return
        finally:
            redis.close()


class Headroom:
    """Room a worker keeps for other tenants while one floods it, so their jobs need not wait.

    Per-tenant streams decide who goes next only when a slot frees up. A flood that holds every slot
    makes another tenant's job wait for the flood's jobs to end (and jobs of equal length end
    together, in waves). So while other streams are active (they held slots within the last
    ``window`` seconds), a stream may hold at most ``capacity`` minus the slots the others held at
    their recent peaks, counting at least one each, and keeping at most a quarter of the capacity
    for them. An active stream thus finds a free slot at once, up to what it used lately; a stream
    alone on the worker, or whose peers went quiet for ``window`` seconds, may use every slot. Room
    is kept only for streams of the same or a higher priority class: batch tenants yield.
    """

    def __init__(self, window: float, capacity: int) -> None:
        self._window = window
        self._capacity = capacity
        self._peaks: dict[str, tuple[int, float]] = {}  # active stream -> (peak held, when reached)

    def update(self, held: Counter[str], now: float) -> None:
        """Record the slots each stream holds now."""
        for stream in set(self._peaks) | set(held):
            count = held.get(stream, 0)
            peak, at = self._peaks.get(stream, (0, now))
            if count >= peak or now - at > self._window:
                peak, at = count, now
            if peak:
                self._peaks[stream] = (peak, at)
            else:
                self._peaks.pop(stream, None)

    def room(
        self, streams: Iterable[str], held: Counter[str], free: int, weights: dict[str, int] | None = None
    ) -> dict[str, int]:
        """Free slots each of ``streams`` may take now (streams with none are left out). With
        ``weights`` (priority class weights), a stream keeps room only for streams weighing as much
        or more: a batch tenant's recent jobs do not hold an interactive flood back."""
        limit = self._capacity // 4 if self._window > 0 else 0
        weight = (weights or {}).get
        wanted = {s: max(1, peak) for s, (peak, _) in self._peaks.items()}
        rooms = {}
        for stream in streams:
            others = (n for s, n in wanted.items() if s != stream and weight(s, 1) >= weight(stream, 1))
            kept = min(limit, sum(others))
            room = min(free, self._capacity - kept - held.get(stream, 0))
            if room > 0:
                rooms[stream] = room
        return rooms


class ReadPlan:
    """How many jobs to take from each tenant stream in one read, weighted by priority class.

    XREADGROUP's COUNT applies to each stream it names, so one read over every tenant's stream takes
    up to COUNT from each: a tenant flooding its stream gets no more per read than a tenant with one
    job waiting. Priority classes are read separately, with per-stream counts in proportion to their
    weights; fractions carry over between reads (a deficit round robin), so interactive 4 : batch 1
    holds even when the worker has room for one job at a time.
    """

    def __init__(self) -> None:
        self._credit: dict[int, float] = {}

    def plan(self, weights: dict[str, int], free: int) -> list[tuple[list[str], int]]:
        """(streams, count per stream) for each class due a read now, highest weight first."""
        if not weights:
            return []
        top = max(weights.values())
        per_stream = max(1, min(READ_BATCH, free * top // sum(weights.values())))
        reads = []
        for weight in sorted(set(weights.values()), reverse=True):
            share = per_stream * weight / top
            credit = min(self._credit.get(weight, 0.0) + share, max(share, 1.0))
            count = int(credit)
            self._credit[weight] = credit - count
            if count:
                reads.append(([s for s, w in weights.items() if w == weight], count))
        return reads


def within(reads: list[tuple[list[str], int]], rooms: dict[str, int]) -> list[tuple[list[str], int]]:
    """``reads`` with no stream asked for more jobs than its room (see :class:`Headroom`)."""
    out = []
    for names, count in reads:
        by_count: dict[int, list[str]] = {}
        for name in names:
            by_count.setdefault(min(count, rooms[name]), []).append(name)
        out += [(group, n) for n, group in sorted(by_count.items(), reverse=True)]
    return out


Entry = tuple[str, str, dict[bytes, bytes] | None]


async def read_fairly(
    redis: Redis,
    consumer: str,
    reads: list[tuple[list[str], int]],
    streams: list[str],
    blocking: Redis | None = None,
) -> list[Entry]:
    """Take new entries by ``reads`` (see :class:`ReadPlan`) in one round trip; when none is
    waiting there, block on every stream (``streams``) for whichever job arrives first (on
    ``blocking``, a client of its own, when given)."""
    replies: list[object] = []
    if reads:
        async with redis.pipeline(transaction=False) as pipe:
            for names, count in reads:
                pipe.xreadgroup(GROUP, consumer, {s: ">" for s in names}, count=count)
            replies = await pipe.execute()
    entries = [entry for reply in replies for entry in _entries(reply)]
    if entries:
        return entries
    reply = await (blocking or redis).xreadgroup(
        GROUP, consumer, {s: ">" for s in streams}, count=1, block=READ_BLOCK_MS
    )
    return _entries(reply)


def _entries(reply: object) -> list[Entry]:
    """XREADGROUP's reply as (stream, entry id, fields) triples."""
    return [
        (_text(stream), _text(entry_id), fields)
        for stream, items in reply or ()  # type: ignore[attr-defined]
        for entry_id, fields in items
    ]


def _claimed_entries(reply: Iterable[object]) -> list[tuple[str, dict[bytes, bytes] | None]]:
    """XAUTOCLAIM's claimed entries on Redis 6.2 (2 items) and 7.x (3 items, deleted ids apart)."""
    items = list(reply)
    entries = items[1] if len(items) > 1 else []
    out: list[tuple[str, dict[bytes, bytes] | None]] = []
    for entry in entries or ():  # type: ignore[attr-defined]
        entry_id, fields = entry
        if entry_id is None:  # Redis 6.2 reports an entry deleted since it was read as nil
            continue
        out.append((_text(entry_id), fields))
    return out
