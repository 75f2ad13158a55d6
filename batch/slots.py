"""Batch slots: each background process runs up to ``max_batches`` batches at once, and fills a
free slot itself with the next batch, a tenant at a time, so that one tenant's thousand batches
cannot keep another's one waiting until its completion window ends.

* A batch waits for a slot while it is unfinished and nobody holds its lease. Each tenant's
  unfinished batches are listed in the order they came (``Names.tenant_active_batches``), and
  ``Names.batch_turns`` orders the tenants by when each was last given a slot: a free slot goes to
  the tenant given one longest ago (round robin; a tenant new to the slots first), to its oldest
  waiting batch. Nothing is queued per waiting
  batch; a process looks when a slot frees, when a batch is created, and every check interval.
* Slots are handed back rather than left idle for fairness: once per check interval (one process
  per tick) the tenants' fair shares of the slots in use are worked out (:func:`fair_yields`), and
  a run of a tenant over its share that has held its slot for ``batch_slice`` seconds gives it back
  while a tenant below its share waits (its lines in flight drain, the batch waits again and picks
  up where it was).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.batches import BatchRequest, owner_key
from shared.names import Names
from shared.scripts import BatchScripts
from shared.settings import BackgroundSettings

log = logging.getLogger(__name__)

PAGE = 100
"""A tenant's unfinished batches looked at, at a time, for one nobody runs."""


def fair_shares(slots: int, demand: Mapping[str, int], running: Mapping[str, int]) -> dict[str, int]:
    """Pure: ``slots`` shared out max-min fairly among tenants that want ``demand`` each (no one
    more than it wants, the rest evenly); a slot that cannot be split evenly goes to a tenant that
    runs more now, so that an uneven remainder stays where it is instead of moving every tick."""
    share = dict.fromkeys(demand, 0)
    wanting = sorted(t for t, d in demand.items() if d > 0)
    left = slots
    while left > 0 and wanting:
        each = left // len(wanting)
        if each == 0:
            for tenant in sorted(wanting, key=lambda t: (-running.get(t, 0), t))[:left]:
                share[tenant] += 1
            break
        for tenant in list(wanting):
            given = min(each, demand[tenant] - share[tenant])
            share[tenant] += given
            left -= given
            if share[tenant] == demand[tenant]:
                wanting.remove(tenant)
    return share


def fair_yields(
    running: Mapping[str, int], waiting: Mapping[str, int], leaving: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Pure: how many more of its slots each tenant's runs should give back, so that tenants with
    batches waiting get their fair share of the slots in use (``running``: slots each tenant holds,
    ``waiting``: its batches that wait for one, ``leaving``: its runs giving a slot back already,
    their lines draining). Taken from those furthest over their share first, and only as many as
    tenants below their share can use."""
    tenants = set(running) | set(waiting)
    demand = {t: running.get(t, 0) + waiting.get(t, 0) for t in tenants}
    share = fair_shares(sum(running.values()), demand, running)
    short = sum(
        min(waiting.get(t, 0), share[t] - running.get(t, 0)) for t in tenants if share[t] > running.get(t, 0)
    )
    over = {t: n - share[t] for t, n in running.items() if n > share[t]}
    out: Counter[str] = Counter()
    while short > 0 and over:
        tenant = max(over, key=lambda t: (over[t], t))
        out[tenant] += 1
        short -= 1
        over[tenant] -= 1
        if not over[tenant]:
            del over[tenant]
    leaving = leaving or {}
    return {t: n - leaving.get(t, 0) for t, n in out.items() if n > leaving.get(t, 0)}


@dataclass
class Scheduler:
    """Who gets the next batch slot, and who gives one back, kept in Redis for every process."""

    redis: Redis
    settings: BackgroundSettings
    _scripts: BatchScripts = field(init=False)

    def __post_init__(self) -> None:
        self._scripts = BatchScripts(self.redis)

    @property
    def names(self) -> Names:
        return self.settings.names

    async def pick(self, token: str) -> tuple[str, str] | None:
        """Take the lease (``token``) of the next batch for a free slot: the oldest batch nobody
        runs of the tenant given a slot longest ago. Returns (batch id, tenant id), or None."""
        n = self.names
        for raw in await self.redis.zrange(n.batch_turns(), 0, -1):
            owner = raw.decode()
            batch_id = await self._take_one_of(owner, token)
            if batch_id is not None:
                await self._scripts.turn(keys=[n.batch_turns()], args=[owner])
                return batch_id, owner
        return None

    async def _take_one_of(self, owner: str, token: str) -> str | None:
        n, lease_ms = self.names, int(self.settings.batch_lease * 1000)
        start = 0
        while ids := [
            i.decode()
            for i in await self.redis.zrange(n.tenant_active_batches(owner), start, start + PAGE - 1)
        ]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for batch_id in ids:
                    pipe.exists(n.batch_lease(batch_id))
                leased = await pipe.execute()
            for batch_id, held in zip(ids, leased, strict=True):
                if not held and await self.redis.set(n.batch_lease(batch_id), token, nx=True, px=lease_ms):
                    await self.redis.hdel(n.batch_leaving(), batch_id)  # type: ignore[misc]
                    return batch_id
            start += PAGE
        if start == 0:  # none left: the tenant leaves the turns (unless a batch came meanwhile)
            await self.forget(owner, "")
        return None

    async def forget(self, owner: str, batch_id: str) -> None:
        """A batch whose record is gone waits for nothing (``""``: no batch), and a tenant with no
        batch left leaves the turns."""
        n = self.names
        await self._scripts.retire(
            keys=[n.active_batches(), n.tenant_active_batches(owner), n.batch_turns()], args=[batch_id, owner]
        )

    async def take_yield(self, owner: str, batch_id: str) -> bool:
        """Whether this run of ``owner``'s batch should give its slot back now (it takes that turn,
        and is counted as leaving, if so)."""
        n = self.names
        keys = [n.batch_yields(), n.batch_leaving()]
        return bool(int(await self._scripts.take_yield(keys=keys, args=[owner, batch_id])))

    async def balance(self) -> dict[str, int]:
        """Once per check interval: work out which tenants' runs give slots back (see
        :func:`fair_yields`), from each tenant's unfinished batches and their leases."""
        n = self.names
        owners = [o.decode() for o in await self.redis.zrange(n.batch_turns(), 0, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.zrange(n.tenant_active_batches(owner), 0, -1)
            pipe.scard(n.active_batches())
            pipe.hgetall(n.batch_leaving())
            *listed, active, marked = await pipe.execute()
        if sum(len(ids) for ids in listed) < active:
            await self._relist()  # counted from the next reckoning on
        batches = [(owner, i.decode()) for owner, ids in zip(owners, listed, strict=True) for i in ids]
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, batch_id in batches:
                pipe.exists(n.batch_lease(batch_id))
            leased = await pipe.execute()
        running: Counter[str] = Counter()
        waiting: Counter[str] = Counter()
        leaving: Counter[str] = Counter()
        held = set()
        for (owner, batch_id), lease in zip(batches, leased, strict=True):
            (running if lease else waiting)[owner] += 1
            if lease and batch_id.encode() in marked:
                leaving[owner] += 1
                held.add(batch_id.encode())
        yields = fair_yields(running, waiting, leaving)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(n.batch_yields())
            if yields:
                pipe.hset(n.batch_yields(), mapping=yields)  # type: ignore[arg-type]
                pipe.expire(n.batch_yields(), 2 * self.settings.batch_check_interval)
            if left := [m for m in marked if m not in held]:  # their slots are free
                pipe.hdel(n.batch_leaving(), *left)
            await pipe.execute()
        return {
            "running": sum(running.values()),
            "waiting": sum(waiting.values()),
            "leaving": sum(leaving.values()),
            "to_give_back": sum(yields.values()),
        }

    async def _relist(self) -> None:
        """List every unfinished batch for a slot that is not listed yet (made by an earlier
        release, which listed them only in ``Names.active_batches``)."""
        n = self.names
        ids = [i.decode() for i in await self.redis.smembers(n.active_batches())]  # type: ignore[misc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hget(n.batch(batch_id), "request")
            found = await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id, raw in zip(ids, found, strict=True):
                if raw is None:
                    continue
                request = BatchRequest.model_validate_json(raw)
                owner = owner_key(request)
                pipe.zadd(n.tenant_active_batches(owner), {batch_id: request.created_at * 1000}, nx=True)
                pipe.zadd(n.batch_turns(), {owner: 0}, nx=True)
            await pipe.execute()


class Runner(Protocol):
    async def run(self, batch_id: str, token: str | None = None) -> str:
        """Run the batch whose lease ``token`` holds; returns what happened."""
        ...


class Slots:
    """This process's batch slots, filled from the batches waiting for one until :meth:`stop`;
    :meth:`run` returns once the runs it started have ended (on a shutdown they drain)."""

    def __init__(self, runner: Runner, scheduler: Scheduler, settings: BackgroundSettings) -> None:
        self._runner = runner
        self._scheduler = scheduler
        self._settings = settings
        self._running: set[str] = set()
        self._wake = anyio.Event()
        self._stopped = False

    def wake(self) -> None:
        """Look for a batch now (one was created, or a slot freed)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    @property
    def running(self) -> set[str]:
        return set(self._running)

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            while not self._stopped:
                try:
                    await self._fill(group)
                except (RedisError, OSError) as exc:
                    log.warning("looking for a batch to run failed: %s", exc)
                with anyio.move_on_after(self._settings.batch_check_interval):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def _fill(self, group: anyio.abc.TaskGroup) -> None:
        while not self._stopped and len(self._running) < self._settings.max_batches:
            token = secrets.token_hex(8)
            picked = await self._scheduler.pick(token)
            if picked is None:
                return
            batch_id, owner = picked
            self._running.add(batch_id)
            group.start_soon(self._run, batch_id, owner, token)

    async def _run(self, batch_id: str, owner: str, token: str) -> None:
        """One run in one slot. A run that fails leaves its batch waiting for the next look (a
        check interval on), not for the slot it frees at once: that would try it again in a loop."""
        try:
            outcome = await self._runner.run(batch_id, token)
        except (RedisError, OSError) as exc:
            log.warning("batch %s: its run failed: %s", batch_id, exc)
            return
        except Exception:  # one batch's failure must not end the other slots' runs
            log.exception("batch %s: its run failed", batch_id)
            return
        finally:
            self._running.discard(batch_id)
        log.info("batch %s: %s", batch_id, outcome)
        if outcome == "gone":
            await self._scheduler.forget(owner, batch_id)
        self.wake()
