"""The background role (``switchyard background``) on arq: batch runs as arq jobs, housekeeping as arq
cron jobs. This is the one module that knows arq, so it could be swapped for another queue.

What arq gives here: durable, deduplicated job ids (a batch run or a cron tick is queued once
however many processes ask), retries, and a schedule every process keeps. What it does not decide:
who runs a batch (its lease, :mod:`batch.run`) and whether a cron tick already ran elsewhere
(a marker per tick, below) -- arq only promises that mostly, and a process that lags a second
behind could run a tick again.

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

from batch.batches import COMPLETION_WINDOW
from batch.feeder import Parts
from batch.housekeeping import Housekeeping
from batch.run import BatchRunner
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
    """Queue a run of the batch; ``key`` makes the job id (a second request with the same key
    while the first is queued or running queues nothing)."""
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
        self.hub = ReplyHub(redis, control_channel=names.hub_channel())
        # As the gateways see the models: with scale-from-zero a batch's lines go on the queue while
        # no worker runs, and their backlog is what starts one.
        self.registry = WorkerRegistry(
            redis, names, settings.worker_ttl, scale_from_zero=settings.scale_from_zero
        )
        self.drain = DrainMeter()
        admission = Admission(redis, names, settings.request_timeout, self.drain, settings.max_backlog_total)
        builder = JobBuilder(self.registry, TokenizerCache(), settings.max_n, settings.affinity_tokens)
        lifecycle = Lifecycle(settings.background_drain_timeout)
        tenants = TenantStore(redis, names)
        parts = Parts(redis, settings, self.hub, builder, admission, tenants, stopping, lifecycle)
        self.runner = BatchRunner(parts)
        self.housekeeping = Housekeeping(redis, settings)

    # -- arq functions (arq calls them with its context first) -------------------------------------

    async def run_batch(self, ctx: dict[str, Any], batch_id: str) -> str:
        return await self.runner.run(batch_id)

    async def expire(self, ctx: dict[str, Any]) -> dict[str, int] | None:
        return await self._tick(ctx, "expire", self.housekeeping.expire)

    async def trim_dead_letters(self, ctx: dict[str, Any]) -> dict[str, int] | None:
        return await self._tick(ctx, "trim-dead-letters", self.housekeeping.trim_dead_letters)

    async def roll_up_usage(self, ctx: dict[str, Any]) -> dict[str, int] | None:
        return await self._tick(ctx, "roll-up-usage", self.housekeeping.roll_up_usage)

    async def check_batches(self, ctx: dict[str, Any]) -> dict[str, int] | None:
        async def revive() -> dict[str, int]:
            tick = tick_of(ctx["job_id"])
            names = self.settings.names
            result = await self.housekeeping.check_batches(lambda b: start_batch(self.redis, names, b, tick))
            return {**result, "pruned": await prune_runs(self.redis, names)}

        return await self._tick(ctx, "check-batches", revive)

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
            timeout=COMPLETION_WINDOW + 3600,  # a run lasts until its batch is done
            max_tries=1,  # a run that ended early is started again by check_batches, not by arq
            keep_result=0,
        )
        return Worker(
            functions=[run_batch],
            cron_jobs=self.cron_jobs(),
            queue_name=names.arq_queue(),
            redis_pool=arq_client(pool, names),
            handle_signals=False,
            max_jobs=settings.max_batches + 8,  # room for the cron jobs beside the batch runs
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
            log.info("switchyard background: batches and housekeeping on %s", names_of(settings))
            await stopping.wait()
            running = [task for task in worker.tasks.values() if not task.done()]
            if running:  # batch runs see `stopping`: they drain their lines and return
                await asyncio.wait(running, timeout=settings.background_drain_timeout + 10)
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
