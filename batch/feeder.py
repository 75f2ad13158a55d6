"""The in-progress phase of a batch: its lines fed to the tenant's batch stream at the pace
:mod:`batch.policy` sets, each followed to its end like a gateway follows a request, and its
result recorded once per ``custom_id``.

What makes a restart safe at any moment: before a line goes on a queue it is assigned to its new
job (Redis keeps ``custom_id -> job id``), and a result is recorded only from the job the line is
assigned to, only if the line has none yet, and only by the process holding the batch's lease (one
Lua step). A line whose job was on a queue when its runner died is run again as a new job, after
the old one is cancelled (a worker skips or aborts it) and unassigned, so it can never also write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Literal

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import APIError, RateLimited, Unavailable
from batch.filestore import FileStore
from batch.input import LineIndex, read_line
from batch.lines import BatchLine, encode_line, response_line
from batch.policy import MAX_ATTEMPTS, Capacity, lines_to_add, retryable
from batch.slots import Scheduler
from serving.admission import Admission, Ticket
from serving.dispatch import Dispatcher, Timeouts
from serving.lifecycle import Lifecycle
from serving.path import JobBuilder, Prepared, new_request_id
from serving.relay import Admitted, collect
from serving.replies import ReplyHub
from shared.batches import BatchState, owner_key
from shared.fleet import live_workers, stream_records
from shared.messages import Job, Usage
from shared.names import GROUP, Names
from shared.scripts import BatchScripts
from shared.settings import BackgroundSettings
from shared.tenants import Tenant, TenantStore

log = logging.getLogger(__name__)

Outcome = Literal["done", "cancelling", "expired", "stopping", "gone", "yielded"]
CHECK_EVERY = 0.5
"""Seconds between reads of the batch's status and the fleet's capacity: a cancel acts this fast."""
INTERACTIVE_MEMORY = 10.0
"""Seconds interactive traffic counts as present after its last job: a pause between two bursts
is no idle capacity to fill with batch lines that would then slow the next burst."""
LOOP_EVERY = 0.05
"""Shortest pause between two rounds of feeding, however fast lines finish."""
TENANT_EVERY = 5.0
PENDING_PAGE = 1000
"""Lines looked up at a time for a result or an earlier run's job."""
NO_WORKER_WAIT = 2.0


class LeaseLost(Exception):
    """Another process runs this batch now; this one must stop without writing anything more."""


@dataclass
class Parts:
    """What every batch run of a background process shares."""

    redis: Redis
    settings: BackgroundSettings
    hub: ReplyHub
    builder: JobBuilder
    admission: Admission
    tenants: TenantStore
    stopping: asyncio.Event
    lifecycle: Lifecycle
    """Knows the lines in flight, as a gateway's knows its requests."""
    files: FileStore
    """Where batch input files are (lines are read from it one at a time)."""
    parsing: anyio.CapacityLimiter
    """Threads that parse input files at once in this process (one: the event loop keeps a core)."""
    scheduler: Scheduler
    """Batch slots: a run gives its slot back when its tenant has more than its share."""

    @property
    def names(self) -> Names:
        return self.settings.names


async def fleet_capacity(redis: Redis, names: Names, model: str, worker_ttl: float) -> Capacity:
    """Free slots of the model's live workers, and the jobs waiting for one, by priority class."""
    workers = [w for w in await live_workers(redis, names, worker_ttl) if w.model == model and not w.draining]
    records = await stream_records(redis, names, model)
    async with redis.pipeline(transaction=False) as pipe:
        for stream in records:
            pipe.xlen(stream)
            pipe.xpending(stream, GROUP)
        replies = await pipe.execute(raise_on_error=False)
    waiting = {"interactive": 0, "batch": 0}
    running = {"interactive": 0, "batch": 0}
    for i, record in enumerate(records.values()):
        length, pending = replies[2 * i], replies[2 * i + 1]
        taken = 0 if isinstance(pending, Exception) else int(pending["pending"])
        queued = 0 if isinstance(length, Exception) else int(length)
        waiting[record.priority] += max(0, queued - taken)
        running[record.priority] += taken
    return Capacity(
        free_slots=sum(max(0, w.capacity - w.inflight) for w in workers),
        interactive_waiting=waiting["interactive"],
        batch_waiting=waiting["batch"],
        interactive_running=running["interactive"],
        batch_running=running["batch"],
    )


async def tenant_of(tenants: TenantStore, name: str, tenant_id: str | None) -> Tenant | None:
    """The tenant ``name`` with its limits in force, if it is the one with ``tenant_id`` (unset in
    batches older than tenant ids); None when it was removed, even if the name was given again."""
    tenant = await tenants.tenant(name)
    if tenant is None or (tenant_id is not None and tenant.id != tenant_id):
        return None
    return tenant


async def cancel_jobs(parts: Parts, job_ids: list[str], keep: float) -> None:
    """Tell the workers to drop these jobs (a worker that takes one within ``keep`` s skips it)."""
    dispatcher = Dispatcher(parts.redis, parts.hub, parts.names, Timeouts(total=1, stall=1))
    for job_id in job_ids:
        await dispatcher.cancel(job_id, keep)


class Feeder:
    def __init__(self, parts: Parts, state: BatchState, lines: LineIndex, token: str, tenant: Tenant) -> None:
        self._parts = parts
        self._state = state
        self._lines = lines
        """Where each line is in the input file: a line is read and parsed when its turn comes."""
        self._token = token
        self._scripts = BatchScripts(parts.redis)
        n, batch_id = parts.names, state.request.id
        self._keys = (n.batch_lease(batch_id), n.batch_results(batch_id), n.batch_jobs(batch_id))
        self._in_flight: set[str] = set()
        self._wake = asyncio.Event()
        self._tenant = tenant
        """Its tenant with the limits in force, read again every few seconds."""
        self._gone = False
        """Its tenant was removed: no more lines; the run stops."""
        self._began = time.monotonic()
        self._owner = owner_key(state.request)
        self._tenant_read = time.monotonic()
        self._checked = float("-inf")
        self._capacity = Capacity(free_slots=0, interactive_waiting=0, batch_waiting=0)
        self._added = 0
        """Lines put on the queue since the capacity was read (they wait there as far as it knows)."""
        self._interactive: deque[tuple[float, int]] = deque()
        """(when, interactive jobs running) over the last INTERACTIVE_MEMORY seconds."""
        left = max(1.0, state.request.expires_at - time.time())
        self._dispatcher = Dispatcher(
            parts.redis,
            parts.hub,
            n,
            Timeouts(total=left + 60, stall=parts.settings.stall_timeout, queue=left + 60),
            cancel_keep=left + 3600,  # a cancelled line may wait on the queue until the batch expires
        )

    async def run(self) -> Outcome:
        """Feed and follow every line without a result; returns why it stopped."""
        pending = self._pending()
        exhausted = False
        outcome: Outcome = "done"
        lost = False
        try:
            async with anyio.create_task_group() as group:
                while not exhausted or self._in_flight:
                    stop = await self._interrupted()
                    if stop is not None:
                        outcome = stop
                        break
                    for _ in range(await self._room()):
                        following = await anext(pending, None)
                        if following is None:
                            exhausted = True
                            break
                        i, previous = following
                        self._in_flight.add(self._lines.custom_ids[i])
                        self._added += 1
                        group.start_soon(self._line, i, previous)
                    await anyio.sleep(LOOP_EVERY)
                    await self._pause(CHECK_EVERY)
                if outcome in ("stopping", "yielded"):
                    await self._drain()
                group.cancel_scope.cancel()  # lines still running are cancelled as they close
        except* LeaseLost:
            lost = True
        finally:
            await pending.aclose()
        if lost:
            log.warning("batch %s: another process took it over; stopping here", self._state.request.id)
            return "stopping"
        if outcome == "done" and not await self._all_answered():
            return "stopping"  # a line ended without a result: the next run feeds it again
        return outcome

    async def _all_answered(self) -> bool:
        results = int(await self._parts.redis.hlen(self._keys[1]))  # type: ignore[misc]
        if results < len(self._lines):
            log.error("batch %s: %d lines have no result", self._state.request.id, len(self._lines) - results)
            return False
        return True

    async def _pending(self) -> AsyncGenerator[tuple[int, str | None]]:
        """Lines without a result, in file order, by their place in the index, with the job an
        earlier run had queued for each (it is cancelled and the line runs again). Read a page at a
        time: a restarted run of a large batch holds no set of its finished lines."""
        redis, (_, results, jobs) = self._parts.redis, self._keys
        ids = self._lines.custom_ids
        for start in range(0, len(ids), PENDING_PAGE):
            page = ids[start : start + PENDING_PAGE]
            async with redis.pipeline(transaction=False) as pipe:
                for custom_id in page:
                    pipe.hexists(results, custom_id)
                pipe.hmget(jobs, page)
                *answered, assigned = await pipe.execute()
            again = sum(1 for done, job in zip(answered, assigned, strict=True) if job and not done)
            if again:
                log.info("batch %s: running %d lines of an earlier run again", self._state.request.id, again)
            for offset, (done, job) in enumerate(zip(answered, assigned, strict=True)):
                if not done:
                    yield start + offset, job.decode() if job is not None else None

    async def _interrupted(self) -> Outcome | None:
        if self._parts.stopping.is_set():
            return "stopping"
        if self._gone:
            return "gone"
        if time.monotonic() - self._checked < CHECK_EVERY:
            return None
        status = await self._parts.redis.hget(self._parts.names.batch(self._state.request.id), "status")  # type: ignore[misc]
        if status == b"cancelling":
            return "cancelling"
        if status != b"in_progress":  # gone, or moved by another process: not ours to finish
            return "stopping"
        if time.time() >= self._state.request.expires_at:
            return "expired"
        sliced = time.monotonic() - self._began >= self._parts.settings.batch_slice
        if sliced and await self._parts.scheduler.take_yield(self._owner, self._state.request.id):
            return "yielded"  # another tenant waits with fewer slots than its share
        return None

    async def _room(self) -> int:
        """Lines to add now (see :func:`lines_to_add`); the window leaves the tenant half its
        concurrency limit for its own interactive requests, and stays within its backlog limit
        (admission would only refuse the lines beyond)."""
        parts, now = self._parts, time.monotonic()
        if now - self._tenant_read > TENANT_EVERY:
            req = self._state.request
            fresh = await tenant_of(parts.tenants, req.tenant, req.tenant_id)
            self._gone = fresh is None
            self._tenant = fresh or self._tenant
            self._tenant_read = now
        if self._gone:
            return 0  # removed: the next check stops the run
        window = parts.settings.batch_window
        if self._tenant.max_concurrent:
            window = min(window, max(1, self._tenant.max_concurrent // 2))
        if self._tenant.max_backlog:
            window = min(window, self._tenant.max_backlog)
        if now - self._checked >= CHECK_EVERY:
            model = self._state.model or ""
            read = await fleet_capacity(parts.redis, parts.names, model, parts.settings.worker_ttl)
            self._interactive.append((now, read.interactive_running))
            while self._interactive[0][0] < now - INTERACTIVE_MEMORY:
                self._interactive.popleft()
            peak = max(n for _, n in self._interactive)
            self._capacity = replace(read, interactive_running=peak)
            self._checked, self._added = now, 0
        capacity = replace(self._capacity, batch_waiting=self._capacity.batch_waiting + self._added)
        return lines_to_add(len(self._in_flight), window, capacity)

    async def _pause(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._wake.wait()
        self._wake.clear()

    async def _drain(self) -> None:
        """On shutdown: let the lines on a queue finish for a while (the rest run again later)."""
        with anyio.move_on_after(self._parts.settings.background_drain_timeout):
            while self._in_flight:
                await self._pause(CHECK_EVERY)

    # -- one line ----------------------------------------------------------------------------------

    async def _line(self, i: int, previous: str | None) -> None:
        """Run one line until it has a result: as a new job for each attempt, the earlier one
        cancelled first so it can never also complete into the output."""
        custom_id = self._lines.custom_ids[i]
        try:
            line = await read_line(
                self._parts.files,
                self._state.request.input_file_id,
                self._lines,
                i,
                self._parts.settings.max_n,
            )
            for attempt in range(1, MAX_ATTEMPTS + 1):
                if previous is not None:
                    await self._dispatcher.cancel(previous, self._dispatcher_keep())
                job_id = new_request_id()
                if not await self._assign(line, job_id, previous):
                    return  # it has a result already
                if await self._attempt(line, job_id, last=attempt == MAX_ATTEMPTS):
                    return
                previous = job_id
        finally:
            self._in_flight.discard(custom_id)
            self._wake.set()

    def _dispatcher_keep(self) -> float:
        return max(1.0, self._state.request.expires_at - time.time()) + 3600

    async def _assign(self, line: BatchLine, job_id: str, previous: str | None) -> bool:
        assigned = await self._scripts.assign(
            keys=list(self._keys), args=[self._token, line.custom_id, job_id, previous or ""]
        )
        if int(assigned) < 0:
            raise LeaseLost
        return bool(int(assigned))

    async def _attempt(self, line: BatchLine, job_id: str, last: bool) -> bool:
        """One job for the line; True once the line has its result (False: try again)."""
        try:
            prepared = await self._build(line, job_id)
            job = prepared.job
            ticket = await self._admit(job)
        except APIError as exc:  # the line's own fault: refused as the endpoint would refuse it
            await self._record(
                line, job_id, response_line(line.custom_id, job_id, exc.status, exc.envelope())
            )
            return True
        stream = self._parts.names.batch_stream(job.model, job.tenant)
        while True:
            try:
                replies = await self._dispatcher.submit(job, "batch", stream=stream)
                break
            except APIError:  # nothing was enqueued (Redis unreachable): the line waits for it
                await anyio.sleep(NO_WORKER_WAIT)
        admitted = Admitted(replies, ticket, self._parts.admission, self._parts.lifecycle)
        replies.restartable = True  # a line's answer is whole or nothing: a new worker may start over
        try:
            body = await collect(replies, prepared.whole())
        except APIError as exc:
            if retryable(exc) and not last:
                log.info("batch line %s failed (%s); running it again", line.custom_id, exc.code)
                return False
            result = response_line(line.custom_id, job_id, exc.status, exc.envelope())
            await self._record(line, job_id, result)
            return True
        finally:
            await admitted.close()
        usage = replies.usage()
        await self._record(line, job_id, response_line(line.custom_id, job_id, 200, body), usage)
        return True

    async def _build(self, line: BatchLine, job_id: str) -> Prepared:
        """The line's job, built as the gateway builds a request's; waits while no worker serves
        the model (the batch continues when one comes back)."""
        parts = self._parts
        while True:
            try:
                entry = await parts.builder.resolve(line.model)
            except Unavailable:
                await anyio.sleep(NO_WORKER_WAIT)
                continue
            if line.url == "/v1/chat/completions":
                return await parts.builder.chat(entry, line.body, self._tenant, job_id)  # type: ignore[arg-type]
            return await parts.builder.completion(entry, line.body, self._tenant, job_id)  # type: ignore[arg-type]

    async def _admit(self, job: Job) -> Ticket:
        """Admission as for any request of the tenant (the batch counts against its limits); a
        limit reached means waiting, not failing. Raises only for a line that can never fit."""
        stream = self._parts.names.batch_stream(job.model, job.tenant)
        while True:
            try:
                return await self._parts.admission.admit(self._tenant, job, stream=stream)
            except RateLimited as exc:
                await anyio.sleep(max(0.2, exc.retry_after))
            except (Unavailable, RedisError, OSError) as exc:
                await anyio.sleep(max(0.5, getattr(exc, "retry_after", 1.0)))

    async def _record(
        self, line: BatchLine, job_id: str, result: dict[str, object], usage: Usage | None = None
    ) -> None:
        status = int(result["response"]["status_code"])  # type: ignore[index]
        outcome = "completed" if 200 <= status < 300 else "failed"
        used = usage or Usage(prompt_tokens=0, completion_tokens=0)
        n, batch_id = self._parts.names, self._state.request.id
        recorded = await self._scripts.result(
            keys=[*self._keys, n.batch(batch_id), n.batch_stats()],
            args=[self._token, line.custom_id, job_id, encode_line(result), outcome,
                  used.prompt_tokens, used.completion_tokens],
        )  # fmt: skip
        if int(recorded) < 0:
            raise LeaseLost
