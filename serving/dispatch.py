"""Enqueue a job and follow its replies: ordering checks, timeouts and cancellation."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from array import array
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import APIError, Conflict, NotFound, Timeout, Unavailable, UpstreamFailure, from_status
from serving.replies import Alarm, ReplyHub, Subscription, SubscriptionLost, WaitExpired
from shared.messages import (
    STOPPED,
    Failure,
    Final,
    Job,
    Priority,
    Started,
    StreamRecord,
    Tokens,
    Usage,
    Vectors,
    WireError,
    decode_reply,
    encode,
)
from shared.names import JOB_FIELD, Names

log = logging.getLogger(__name__)

CANCEL_MARKER_TTL = 600
OWNER_MARGIN = 300.0
"""Seconds a job's owner record outlives the longest its request may take: a client may take up
the stream of a job that just ended a little longer (the job's replies are kept that long too)."""


def owner_record(job: Job) -> str:
    """The tenant of a job and a digest of what it asks (prompt and sampling): taking up its
    stream needs both, so another tenant's key, or another request, cannot."""
    digest = hashlib.blake2b(encode(job.sampling).encode(), digest_size=12)
    digest.update(array("l", job.prompt_token_ids).tobytes())
    return f"{job.tenant}:{digest.hexdigest()}"


def epoch_of(start: Started) -> str:
    """A short mark of the attempt that began an answer (a client's event ids carry it)."""
    return f"{zlib.crc32(f'{start.worker}/{start.attempt}'.encode()):08x}"


class Stopped(Conflict):
    """The job a request takes up again was stopped before it ended (its client left): its answer
    can no longer be given, and no reply will come (what a worker says when it drops such a job,
    :data:`shared.messages.STOPPED`, said before it could)."""

    code = STOPPED.code

    def __init__(self) -> None:
        super().__init__(STOPPED.message)


@dataclass(frozen=True, slots=True)
class Timeouts:
    total: float
    """Longest the whole request may take, queueing included."""
    stall: float
    """Longest silence once a worker has started the job."""
    queue: float = float("inf")
    """Longest wait for a worker to start the job."""


@dataclass(frozen=True, slots=True)
class Enqueuing:
    """What enqueueing a job writes (:meth:`Dispatcher.enqueuing`), as a script's keys and arguments:
    admission writes it in its own step when it admits the job."""

    keys: tuple[str, str, str]
    """The job stream, its model's index of streams, the job's owner record."""
    args: tuple[str, str, str, str, int]
    """The stream's field, the job, the stream's index record, the owner record, its seconds to live."""


class Track(Protocol):
    """What is measured of one request as its replies pass (the gateway's metrics)."""

    def saw(self, reply: Started | Tokens | Vectors | Final) -> None: ...

    def failed(self, exc: APIError) -> None: ...

    def close(self) -> None: ...


class Tracker(Protocol):
    def track(self, job: Job) -> Track: ...


class Untracked:
    """Measures nothing: for a process that exports no request metrics (the background role)."""

    def track(self, job: Job) -> Untracked:
        return self

    def saw(self, reply: Started | Tokens | Vectors | Final) -> None:
        pass

    def failed(self, exc: APIError) -> None:
        pass

    def close(self) -> None:
        pass


class Dispatcher:
    """Puts jobs on their tenant's stream and hands back their reply streams."""

    def __init__(
        self,
        redis: Redis,
        hub: ReplyHub,
        names: Names,
        timeouts: Timeouts,
        metrics: Tracker | None = None,
        cancel_keep: float = CANCEL_MARKER_TTL,
    ) -> None:
        self.metrics: Tracker = metrics or Untracked()
        self._redis = redis
        self._hub = hub
        self._names = names
        self._timeouts = timeouts
        self._cancel_keep = cancel_keep
        """How long a cancelled job's marker stays: as long as the job may still wait on a queue."""

    def connected(self) -> bool:
        """Whether replies can be received now (the shared pub/sub connection is up)."""
        return self._hub.connected.is_set()

    async def submit(
        self, job: Job, priority: Priority = "interactive", stream: str | None = None
    ) -> ReplyStream:
        """Subscribe to the job's replies first, then enqueue it (on its tenant's stream of the
        model unless ``stream`` names another, e.g. the tenant's batch stream)."""
        return await self.enqueue(job, await self.subscribe(job), priority, stream)

    async def subscribe(self, job: Job) -> Subscription:
        """Subscribe to the job's replies (confirmed by Redis): done before the job is enqueued,
        since a worker may publish its first reply at once."""
        try:
            return await self._hub.open(self._names.reply_channel(job.id))
        except SubscriptionLost as exc:
            raise Unavailable(f"the queue is unreachable: {exc}", retry_after=2) from exc

    async def enqueue(
        self, job: Job, sub: Subscription, priority: Priority = "interactive", stream: str | None = None
    ) -> ReplyStream:
        """Put the job on its stream, its replies already subscribed to as ``sub`` (closed if the
        job cannot be enqueued)."""
        e = self.enqueuing(job, priority, stream)
        stream, index, owner = e.keys
        _, payload, record, who, keep = e.args
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(stream, {JOB_FIELD: payload})
                pipe.hset(index, stream, record)
                pipe.set(owner, who, ex=keep)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            await self._hub.close(sub)
            raise Unavailable("the queue is unreachable; nothing was enqueued", retry_after=2) from exc
        except BaseException:  # cancelled: nobody else will close it
            await self._hub.close(sub)
            raise
        return self.follow(job, sub)

    def enqueuing(self, job: Job, priority: Priority = "interactive", stream: str | None = None) -> Enqueuing:
        """What enqueueing ``job`` writes: the job on its stream (its tenant's of the model unless
        ``stream`` names another), the stream in its model's index, and who may take up the job's
        replies again, and for which request (see :meth:`attach`)."""
        stream = stream or self._names.jobs_stream(job.model, job.tenant)
        record = StreamRecord(tenant=job.tenant, priority=priority)
        keep = max(1, round(self._timeouts.total + OWNER_MARGIN))
        return Enqueuing(
            keys=(stream, self._names.streams_index(job.model), self._names.owner(job.id)),
            args=(JOB_FIELD, encode(job), encode(record), f"{owner_record(job)}:{job.created_at}", keep),
        )

    def follow(self, job: Job, sub: Subscription) -> ReplyStream:
        """The replies of ``job``, enqueued with ``sub`` subscribed to them before."""
        return ReplyStream(job, sub, self, self._timeouts)

    async def close(self, sub: Subscription) -> None:
        """Undo :meth:`subscribe` for a job that was not enqueued."""
        await self._hub.close(sub)

    async def attach(self, job: Job) -> ReplyStream:
        """Take up the replies of ``job``, enqueued earlier by this or another gateway for the same
        tenant and request (``job`` rebuilt from the same body, under its first id): subscribe,
        then read every reply so far from its progress list, then follow the live ones (each
        reply once, whichever way it came). Raises :class:`NotFound` for a job that is not the
        tenant's, or whose replies are no longer kept, and :class:`Stopped` for one stopped
        before it ended (rather than wait for replies that will never come)."""
        try:
            owner = await self._redis.get(self._names.owner(job.id))
        except (RedisError, OSError) as exc:
            raise Unavailable("the queue is unreachable", retry_after=2) from exc
        record, _, created = (owner or b"").decode().rpartition(":")
        if record != owner_record(job):
            raise NotFound("there is no such stream to take up for this key and request")
        job = job.model_copy(update={"created_at": float(created)})
        sub = await self.subscribe(job)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.lrange(self._names.progress(job.id), 0, -1)
                pipe.exists(self._names.cancelled(job.id))
                pipe.incr(self._names.attached(job.id))
                pipe.expire(self._names.attached(job.id), max(1, round(self._timeouts.total)))
                history, cancelled, attached, _ = await pipe.execute()
            replies = [decode_reply(raw) for raw in history]
            # A job is cancelled only if it had not ended; one whose end got out all the same
            # (it came as the cancel went) is answered from it.
            if cancelled and not any(isinstance(r, Final | Failure) for r in replies):
                raise Stopped()
        except (RedisError, OSError, WireError) as exc:
            await self._hub.close(sub)
            raise Unavailable(f"the stream cannot be read back: {exc}", retry_after=2) from exc
        except BaseException:
            await self._hub.close(sub)
            raise
        stream = ReplyStream(job, sub, self, self._timeouts)
        stream.attached = int(attached)
        stream.preload(replies)
        return stream

    async def attachments(self, job_id: str) -> int:
        """How many times a client took up the job's stream again (see :meth:`attach`)."""
        return int(await self._redis.get(self._names.attached(job_id)) or 0)

    async def was_cancelled(self, job_id: str) -> bool:
        return bool(await self._redis.exists(self._names.cancelled(job_id)))

    async def keep_replies(self, job_id: str, seconds: float) -> None:
        """Keep a finished job's replies (and who may read them) longer than workers do."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.expire(self._names.progress(job_id), max(1, round(seconds)))
            pipe.expire(self._names.owner(job_id), max(1, round(seconds)))
            await pipe.execute()

    async def unsubscribe(self, opening: asyncio.Task[Subscription]) -> None:
        """Undo :meth:`subscribe` run as ``opening`` for a job that will not be enqueued."""
        try:
            sub = await opening
        except (APIError, asyncio.CancelledError):
            return  # it never subscribed
        await self._hub.close(sub)

    async def release(self, stream: ReplyStream, *, cancel: bool) -> None:
        await self._hub.close(stream.subscription)
        if cancel:
            await self.cancel(stream.job.id, self._cancel_keep)

    async def cancel(self, job_id: str, keep: float = CANCEL_MARKER_TTL) -> None:
        """Tell the workers to drop a job: one that takes it within ``keep`` seconds skips it, one
        running it aborts."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._names.cancelled(job_id), b"1", ex=max(1, round(keep)))
                pipe.publish(self._names.cancel_channel(), job_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not cancel job %s: %s", job_id, exc)


class ReplyStream:
    """The replies of one job, in order; raises APIError subclasses on any failure."""

    def __init__(self, job: Job, sub: Subscription, owner: Dispatcher, timeouts: Timeouts) -> None:
        self.job = job
        self.generated = 0
        """Tokens the client has been sent (a resumed start must continue from exactly these)."""
        self.final: Final | None = None
        self.error: str | None = None
        """The code of the error the job ended with, if it did."""
        self._closed = False
        self._queue_deadline = time.monotonic() + timeouts.queue
        self.subscription = sub
        self._owner = owner
        self._timeouts = timeouts
        self._deadline = time.monotonic() + timeouts.total
        self._expected = 0
        self._delivered_tokens = False
        self.finished = False
        self.started_at: float | None = None
        self.restartable = False
        """Nothing of the answer reached the client yet (it gets the whole answer at the end): a
        worker taking the job over may start it from the top rather than resume it."""
        self.epoch = ""
        """Marks the attempt that began the answer the client is getting (:func:`epoch_of`): one
        that starts over begins a new answer, and a client cannot take up the old one's in it."""
        self.attached = 0
        """How many clients had taken the job's stream up when this one began following it (0 for
        the request that enqueued it): a later take-up counts more (see :class:`Resumable`)."""
        self.track = owner.metrics.track(job)
        self._backlog: deque[Started | Tokens | Vectors | Final | Failure] = deque()
        self._catching_up = False
        self._alarm = Alarm(sub)

    async def __aiter__(self) -> AsyncIterator[Started | Tokens | Vectors | Final]:
        try:
            async for reply in self._replies():
                self.track.saw(reply)
                yield reply
        except APIError as exc:
            self.error = exc.code or "error"
            exc.admitted = True
            self.track.failed(exc)
            raise

    def preload(self, replies: list[Started | Tokens | Vectors | Final | Failure]) -> None:
        """Replies published before this stream subscribed (read back from the job's progress
        list): they come first, and the live ones they already hold are skipped."""
        self._backlog.extend(replies)
        self._catching_up = True

    async def _replies(self) -> AsyncIterator[Started | Tokens | Vectors | Final]:
        while not self.finished:
            reply = await self._next()
            if self._catching_up and reply.seq < self._expected and not self._starts_over(reply):
                continue  # read back already, and heard live too
            if isinstance(reply, Started):
                self._on_started(reply)
            elif reply.seq != self._expected:
                raise UpstreamFailure(
                    f"reply stream broken: expected message {self._expected}, got {reply.seq}",
                    code="reply_gap",
                )
            self._expected = reply.seq + 1
            if isinstance(reply, Failure):
                self.finished = True
                raise from_status(reply.status, reply.code, reply.message)
            if isinstance(reply, Final):
                self.finished = True
                self.final = reply
            elif isinstance(reply, Tokens):
                self._delivered_tokens = True
                self.generated += len(reply.token_ids)
            yield reply

    def _on_started(self, reply: Started) -> None:
        # A start is fine when nothing reached the client yet, or when it resumes exactly from
        # what the client has (same next message, same number of tokens): never duplicate or skip.
        # A job that cannot resume (several choices, or held by a grammar) starts over, which only
        # a client that has been sent nothing yet can take.
        fresh = reply.seq == 0 and (not self._delivered_tokens or self.restartable)
        resumed = reply.seq == self._expected and reply.resumed_tokens == self.generated
        if not (fresh or resumed):
            raise UpstreamFailure(
                "the worker running this request was lost and the stream cannot be resumed exactly",
                code="worker_lost",
            )
        if fresh:
            self.generated = 0
            self._delivered_tokens = False
        if self.started_at is None:
            self.started_at = time.monotonic()
        if reply.seq == 0:
            self.epoch = epoch_of(reply)

    def _starts_over(self, reply: Started | Tokens | Vectors | Final | Failure) -> bool:
        return isinstance(reply, Started) and reply.seq == 0 and epoch_of(reply) != self.epoch

    async def _next(self) -> Started | Tokens | Vectors | Final | Failure:
        if self._backlog:
            return self._backlog.popleft()
        now = time.monotonic()
        remaining = self._deadline - now
        if remaining <= 0:
            raise Timeout("the request took longer than the gateway's request timeout")
        if self.started_at is None:
            queue_left = self._queue_deadline - now
            wait, why = min(remaining, queue_left), "queue" if queue_left < remaining else "total"
        else:
            wait, why = (
                min(remaining, self._timeouts.stall),
                "stall" if self._timeouts.stall < remaining else "total",
            )
        try:
            # Not a timeout per message (asyncio.timeout's scope cost a twentieth of a busy gateway's
            # CPU): the alarm fails the wait when it has lasted ``wait``, and fires about once per
            # stall timeout, not once per message.
            self._alarm.waiting(now + wait, why)
            try:
                raw = await self.subscription.get()
            finally:
                self._alarm.done()
        except WaitExpired as exc:
            why = exc.why
            if why == "queue":
                raise Unavailable(
                    "no worker started the request in time; the system is overloaded",
                    retry_after=5,
                    code="queue_timeout",
                ) from exc
            if why == "stall":
                raise Timeout("the worker stopped sending tokens", code="stalled") from exc
            raise Timeout("the request took longer than the gateway's request timeout") from exc
        except SubscriptionLost as exc:
            raise Unavailable(str(exc), retry_after=2) from exc
        try:
            return decode_reply(raw)
        except WireError as exc:
            raise UpstreamFailure(str(exc), code="bad_reply") from exc

    async def keep(self, seconds: float) -> None:
        """Keep this finished job's replies for ``seconds`` (see :meth:`Dispatcher.keep_replies`)."""
        await self._owner.keep_replies(self.job.id, seconds)

    def interrupt(self, error: APIError) -> None:
        """Make the reader of these replies fail with ``error`` (e.g. the gateway is stopping)."""
        self.subscription.fail(error)

    def usage(self) -> Usage:
        """What the request used: the worker's count when it finished, else the prompt and the
        tokens the client was sent before it ended."""
        if self.final is not None:
            return self.final.usage
        return Usage(prompt_tokens=len(self.job.prompt_token_ids), completion_tokens=self.generated)

    async def close(self, stop: bool = True) -> None:
        """Stop listening; if the job had not finished (and ``stop``), tell the workers to drop
        it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._alarm.cancel()
        self.track.close()
        await self._owner.release(self, cancel=stop and not self.finished)
