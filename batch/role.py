"""The background role (``switchyard background``) on arq: housekeeping as arq cron jobs, and the
batch slots of :mod:`batch.slots` beside them, woken by an arq job when a batch is created. This is
the one module that knows arq, so it could be swapped for another queue.

What arq gives here: durable, deduplicated job ids (a wake-up or a cron tick is queued once however
many processes ask) and a schedule every process keeps. What it does not decide: which batch runs
where (the slots, a tenant at a time; a batch's lease, :mod:`batch.run`) and whether a cron tick
already ran elsewhere (a marker per tick, below) -- arq only promises that mostly, and a process
that lags a second behind could run a tick again. Batch runs are not arq jobs: a job per waiting
batch, each answering "busy here" on a full process, was a thousand jobs a tick for a thousand
batches.

Jobs are JSON (arq's default is pickle, which never crosses a process boundary here).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.cron import CronJob, cron
from arq.worker import Worker, func
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import RedisError

from batch.feeder import Parts
from batch.filestore import file_store
from batch.housekeeping import Housekeeping
from batch.run import BatchRunner
from batch.slots import Scheduler, Slots
from serving.admission import Admission, DrainMeter
from serving.lifecycle import Lifecycle
from serving.path import JobBuilder
from serving.registry import WorkerRegistry
from serving.replies import ReplyHub
from serving.tokenizer import TokenizerCache
from shared.fleet import gather
from shared.names import Names
from shared.settings import BackgroundSettings, redact_url
from shared.tenants import TenantStore

log = logging.getLogger(__name__)

RUN_BATCH = "run_batch"
CRON_TIMEOUT = 300
TICK_MARKER_TTL = 86400
REDIS_RETRY = 2.0
FLEET_PERIOD = 2.0


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _loads(raw: bytes) -> Any:
    return json.loads(raw)


def arq_client(pool: ConnectionPool, names: Names) -> ArqRedis:
    """arq's client on an existing connection pool (arq never closes it)."""
    return ArqRedis(
        pool, job_serializer=_dumps, job_deserializer=_loads, default_queue_name=names.arq_queue()
    )


async def start_batch(redis: Redis, names: Names, batch_id: str, key: str) -> None:
    """A batch was created: wake a background process's batch slots; ``key`` makes the job id (a
    second request with the same key while the first is queued queues nothing)."""
    job_id = names.background_job("run-batch", f"{batch_id}:{key}")
    await arq_client(redis.connection_pool, names).enqueue_job(RUN_BATCH, batch_id, _job_id=job_id)


async def prune_runs(redis: Redis, names: Names) -> int:
    """Drop queued runs of batches that are no longer active. A run whose process was killed stays
    in arq's queue, marked in progress for the whole run timeout, and arq would look at it on every
    poll until then; its batch is finished (or taken over) long before."""
    prefix = names.background_job("run-batch", "")
    pruned = 0
    async for member, _ in redis.zscan_iter(names.arq_queue(), match=prefix + "*"):
        job_id = member.decode()
        batch_id = job_id.removeprefix(prefix).rsplit(":", 1)[0]
        if await redis.sismember(names.active_batches(), batch_id):  # type: ignore[misc]
            continue
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrem(names.arq_queue(), job_id)
            pipe.delete(*(key + job_id for key in (job_key_prefix, in_progress_key_prefix, retry_key_prefix)))
            await pipe.execute()
        pruned += 1
    return pruned


def cron_fields(period: int) -> dict[str, set[int]]:
    """Pure: arq cron fields for a run every ``period`` seconds (a divisor of a minute, or whole
    minutes dividing an hour), aligned to the clock so that every process agrees on the ticks."""
    if period < 60:
        return {"second": set(range(0, 60, period))}
    return {"minute": set(range(0, 60, period // 60)), "second": {0}}


def tick_of(job_id: str) -> str:
    """The scheduled time (ms) in the id arq gives a cron job's run (``<name>:<ms>``)."""
    return job_id.rsplit(":", 1)[-1]


async def first_run(redis: Redis, names: Names, name: str, tick: str) -> bool:
    """Claim one tick of a cron job: True for the first process to ask, False for any other."""
    return bool(await redis.set(names.cron_ran(name, tick), b"1", nx=True, ex=TICK_MARKER_TTL))


class Background:
    """What a ``switchyard background`` process runs: batch runs and the housekeeping schedule."""

    def __init__(self, settings: BackgroundSettings, redis: Redis, stopping: asyncio.Event) -> None:
        names = settings.names
        self.settings = settings
        self.redis = redis
        self.stopping = stopping
        self.hub = ReplyHub.for_process(redis, names)
        # As the gateways see the models: with scale-from-zero a batch's lines go on the queue while
        # no worker runs, and their backlog is what starts one.
        self.registry = WorkerRegistry(
            redis, names, settings.worker_ttl, scale_from_zero=settings.scale_from_zero
        )
        self.drain = DrainMeter()
        admission = Admission(redis, names, settings.request_timeout, self.drain, settings.max_backlog_total)
        builder = JobBuilder(
            self.registry,
            TokenizerCache(),
            settings.max_n,
            settings.affinity_tokens,
            settings.prefix_cache_scope,
        )
        lifecycle = Lifecycle(settings.background_drain_timeout)
        tenants = TenantStore(redis, names, settings.tenant_defaults())
        store = file_store(settings, redis)
        parsing = anyio.CapacityLimiter(1)
        self.scheduler = Scheduler(redis, settings)
        parts = Parts(
            redis, settings, self.hub, builder, admission, tenants, stopping, lifecycle, store, parsing,
            self.scheduler,
        )  # fmt: skip
        self.runner = BatchRunner(parts)
        self.slots = Slots(self.runner, self.scheduler, settings)
        self.housekeeping = Housekeeping(redis, settings)

    # -- arq functions (arq calls them with its context first) -------------------------------------

    async def run_batch(self, ctx: dict[str, Any], batch_id: str) -> str:
        """A batch was created: this process looks for a batch to run at once, if it has a free
        slot (which batch is the slots' choice, a tenant at a time; any process may take it)."""
        self.slots.wake()
        taken = len(self.slots.running)
        return f"looking for a batch to run ({taken} of {self.settings.max_batches} slots taken)"

    async def expire(self, ctx: dict[str, Any]) -> dict[str, int] | None:
        return await self._tick(ctx, "expire", self.housekeeping.expire)

    async def trim_dead_letters(self, ctx: dict[str, Any]) -> dict[str, int] | None:
        return await self._tick(ctx, "trim-dead-letters", self.housekeeping.trim_dead_letters)

    async def recount_files(self, ctx: dict[str, Any]) -> dict[str, int] | None:
        return await self._tick(ctx, "recount-files", self.housekeeping.recount_files)

    async def roll_up_usage(self, ctx: dict[str, Any]) -> dict[str, int] | None:
        return await self._tick(ctx, "roll-up-usage", self.housekeeping.roll_up_usage)

    async def check_batches(self, ctx: dict[str, Any]) -> dict[str, int] | None:
        """Which tenants' runs give batch slots back (see :mod:`batch.slots`); runs of batches that
        finished leave arq's queue. Batches nobody runs are taken by free slots on their own."""

        async def balance() -> dict[str, int]:
            result = await self.scheduler.balance()
            return {**result, "pruned": await prune_runs(self.redis, self.settings.names)}

        return await self._tick(ctx, "check-batches", balance)

    async def _tick(
        self, ctx: dict[str, Any], name: str, work: Callable[[], Awaitable[dict[str, int]]]
    ) -> dict[str, int] | None:
        """Run one tick of a cron job, unless another process already did."""
        tick = tick_of(ctx["job_id"])
        if not await first_run(self.redis, self.settings.names, name, tick):
            return None
        started = time.monotonic()
        result = await work()
        await self.housekeeping.log_run(name, tick, result, time.monotonic() - started)
        return result

    # -- the arq worker ----------------------------------------------------------------------------

    def cron_jobs(self) -> list[CronJob]:
        names, settings = self.settings.names, self.settings
        every = cron_fields(settings.housekeeping_interval)
        often = cron_fields(settings.batch_check_interval)
        schedule: list[tuple[str, Any, dict[str, set[int]]]] = [
            ("expire", self.expire, every),
            ("trim-dead-letters", self.trim_dead_letters, every),
            ("roll-up-usage", self.roll_up_usage, every),
            ("recount-files", self.recount_files, every),
            ("check-batches", self.check_batches, often),
        ]
        return [
            cron(job, name=names.cron(name), timeout=CRON_TIMEOUT, max_tries=1, **fields)  # type: ignore[arg-type]
            for name, job, fields in schedule
        ]

    def worker(self) -> Worker:
        names, settings = self.settings.names, self.settings
        pool = ConnectionPool.from_url(settings.redis_url, health_check_interval=30)
        run_batch = func(
            self.run_batch,  # type: ignore[arg-type]
            name=RUN_BATCH,
            timeout=60,  # it only wakes this process's batch slots
            max_tries=1,
            keep_result=0,
        )
        return Worker(
            functions=[run_batch],
            cron_jobs=self.cron_jobs(),
            queue_name=names.arq_queue(),
            redis_pool=arq_client(pool, names),
            handle_signals=False,
            max_jobs=16,  # cron jobs and wake-ups (batch runs are the slots', outside arq)
            keep_result=0,
            retry_jobs=False,
            job_serializer=_dumps,
            job_deserializer=_loads,
        )


async def serve(settings: BackgroundSettings) -> None:
    """Run the background role until SIGTERM or SIGINT; then batch runs stop feeding, give their lines
    ``background_drain_timeout`` to finish, and hand the rest back (another process continues them)."""
    redis = Redis.from_url(settings.redis_url, health_check_interval=30)
    stopping = asyncio.Event()
    role = Background(settings, redis, stopping)
    worker = role.worker()

    def stop() -> None:
        log.info("stopping: no new background jobs; batch runs hand their lines back")
        worker.allow_pick_jobs = False
        stopping.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(role.hub.run)
            group.start_soon(watch_fleet, redis, settings, role.drain)
            group.start_soon(keep_polling, worker)
            async with anyio.create_task_group() as slots:
                slots.start_soon(role.slots.run)
                log.info("switchyard background: batches and housekeeping on %s", names_of(settings))
                await stopping.wait()
                role.slots.stop()  # no new runs; the running ones see `stopping`, drain and return
                deadline = anyio.current_time() + settings.background_drain_timeout + 10
                slots.cancel_scope.deadline = deadline
            running = [task for task in worker.tasks.values() if not task.done()]
            if running:  # housekeeping under way
                await asyncio.wait(running, timeout=max(1.0, deadline - anyio.current_time()))
            group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await worker.close()
            await redis.aclose()


async def watch_fleet(redis: Redis, settings: BackgroundSettings, drain: DrainMeter) -> None:
    """Feed admission's drain meter (overload 503s, Retry-After) with the fleet's state, as a
    gateway's queue probe does; a failed reading leaves its figures to go stale."""
    while True:
        try:
            async with asyncio.timeout(FLEET_PERIOD * 2):
                drain.observe(await gather(redis, settings.names, settings.worker_ttl))
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("reading the fleet's state failed: %s", exc)
        await anyio.sleep(FLEET_PERIOD)


async def keep_polling(worker: Worker) -> None:
    """arq's loop, started again after Redis went away (arq itself would end with the error)."""
    while True:
        try:
            await worker.main()
            return
        except (RedisError, OSError) as exc:
            log.warning("background queue: lost Redis (%s); retrying in %.0fs", exc, REDIS_RETRY)
            await anyio.sleep(REDIS_RETRY)


def names_of(settings: BackgroundSettings) -> str:
    return f"{redact_url(settings.redis_url)} (prefix {settings.key_prefix})"
