"""Admission: per-tenant rate limits and backlog caps (atomic in Redis), and a bound on the total
backlog with a Retry-After derived from how fast workers are actually draining it.

The one owner of a request's token accounting: :meth:`Admission.admit` reserves what a job may use
(prompt + ``max_tokens`` for each choice), :meth:`Admission.settle` gives back what it did not use.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from api.errors import InvalidRequest, RateLimited, Unavailable
from serving.dispatch import Enqueuing
from serving.pipelined import Pipelined
from shared.fleet import Snapshot
from shared.messages import Job, Usage, UsageEvent
from shared.names import Names
from shared.scripts import Scripts, is_noscript
from shared.tenants import Tenant

WINDOW_MS = 60_000
USAGE_LOG_BOUND = 500_000
"""Most finished requests the usage log keeps while the roll-ups (``switchyard jobs``) do not run:
beyond it the oldest are dropped rather than Redis's memory filled."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request, and the rate-limit headers to send back."""

    tenant: str
    request_id: str
    headers: dict[str, str]


def reservation(job: Job) -> int:
    """Tokens a job may use at most: its prompt, and ``max_tokens`` for each of its choices."""
    return len(job.prompt_token_ids) + job.sampling.max_tokens * job.sampling.n


def default_output(room: int, prompt_tokens: int, n: int, tpm: int | None) -> int:
    """The output budget of a request that names none: up to the end of the context, but for a
    tenant with a tokens-per-minute limit no more than that limit leaves for each choice (a request
    can never use more than a minute's tokens, so reserving the whole context would only refuse it).
    At least 1, so that a prompt over the limit is refused by admission with its own message."""
    if tpm is None:
        return room
    return max(1, min(room, (tpm - prompt_tokens) // n))


def reset_text(ms: float) -> str:
    """OpenAI-style reset duration: ``"1s"``, ``"6m0s"``, ``"250ms"``."""
    if ms < 1000:
        return f"{max(0, int(ms))}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


def limit_headers(
    tenant: Tenant, requests_used: int, tokens_used: int, reset_req: float, reset_tok: float
) -> dict[str, str]:
    headers: dict[str, str] = {}
    if tenant.rpm:
        headers["x-ratelimit-limit-requests"] = str(tenant.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, tenant.rpm - requests_used))
        headers["x-ratelimit-reset-requests"] = reset_text(reset_req)
    if tenant.tpm:
        headers["x-ratelimit-limit-tokens"] = str(tenant.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, tenant.tpm - tokens_used))
        headers["x-ratelimit-reset-tokens"] = reset_text(reset_tok)
    return headers


class Admission:
    def __init__(
        self, redis: Redis, names: Names, request_ttl: float, drain: DrainMeter, max_backlog_total: int
    ) -> None:
        self._scripts = Scripts(redis)
        self._names = names
        self._ttl_ms = int(request_ttl * 1000) + 30_000
        self._drain = drain
        self._max_total = max_backlog_total
        self._batch = Pipelined(redis)
        """Admissions and settlements that come while others are on their way go together."""

    async def prepare(self) -> None:
        """Load the scripts now, so the first request does not wait for it."""
        await self._scripts.load()

    async def precheck(self, tenant: Tenant, model: str, stream: str | None = None) -> None:
        """Refuse at once (429/503, booking nothing) a request whose tenant is over a limit already,
        or whose model is at capacity: checked before the prompt is encoded, which may take a chat
        template over megabytes. :meth:`admit` checks again with the request's tokens."""
        self._check_total(model)
        if not (tenant.rpm or tenant.tpm or tenant.max_concurrent or tenant.max_backlog):
            return
        result = await self._run(
            self._scripts.precheck, tenant, "", 0, stream or self._names.jobs_stream(model, tenant.name)
        )
        if int(result[0]) != 1:
            raise self._refused(tenant, model, result)

    async def admit(self, tenant: Tenant, job: Job, stream: str | None = None) -> Ticket:
        """Reserve the job's slot and tokens, or raise 429/503 (fail closed without Redis). The
        tenant's backlog is counted on ``stream``, its job stream of the model unless given."""
        return await self._admit(tenant, job.id, job, reservation(job), 1, stream)

    async def admit_enqueue(self, tenant: Tenant, job: Job, enqueue: Enqueuing) -> Ticket:
        """:meth:`admit`, and the job enqueued as ``enqueue`` writes it, in one round trip: nothing
        is enqueued unless it is admitted (the tenant's backlog is counted on the job's stream)."""
        return await self._admit(tenant, job.id, job, reservation(job), 1, None, enqueue)

    async def admit_jobs(self, tenant: Tenant, request_id: str, jobs: Sequence[Job]) -> Ticket:
        """Admit one request made of several jobs (a text completion's prompts) as one request:
        one against the requests per minute and one concurrency slot (what a client holds open),
        the tokens of every job reserved at once, and room in the backlog for every job (what the
        workers will see queued). :meth:`settle` the ticket once, when every job has ended."""
        if tenant.max_backlog and len(jobs) > tenant.max_backlog:
            raise InvalidRequest(
                f"this request makes {len(jobs)} jobs (one per prompt), more than tenant "
                f"'{tenant.name}' may have queued at once ({tenant.max_backlog}); send fewer prompts",
                param="prompt",
                code="too_many_prompts",
            )
        tokens = sum(reservation(job) for job in jobs)
        return await self._admit(tenant, request_id, jobs[0], tokens, len(jobs), None)

    async def _admit(
        self,
        tenant: Tenant,
        request_id: str,
        job: Job,
        tokens: int,
        jobs: int,
        stream: str | None,
        enqueue: Enqueuing | None = None,
    ) -> Ticket:
        """``job``: the request's (its first, of several): what they share, the model and the kind."""
        model = job.model
        self._check_total(model)
        if enqueue is not None:
            stream = enqueue.keys[0]
        result = await self._run(
            self._scripts.admit if enqueue is None else self._scripts.admit_enqueue,
            tenant,
            request_id,
            tokens,
            stream or self._names.jobs_stream(model, tenant.name),
            jobs,
            enqueue,
        )
        if int(result[0]) == 1:
            _, req_used, tok_used, reset_req, reset_tok = (int(x) for x in result)
            return Ticket(
                tenant.name, request_id, limit_headers(tenant, req_used, tok_used, reset_req, reset_tok)
            )
        raise self._refused(tenant, model, result, jobs, embedding=job.embed is not None)

    def _check_total(self, model: str) -> None:
        backlog = self._drain.backlog(model)
        if backlog >= self._max_total:
            raise Unavailable(
                "the system is at capacity; retry later",
                retry_after=self._drain.retry_after(model, backlog - self._max_total + 1),
                code="overloaded",
            )

    async def _run(
        self,
        script: AsyncScript,
        tenant: Tenant,
        request_id: str,
        tokens: int,
        stream: str,
        jobs: int = 1,
        enqueue: Enqueuing | None = None,
    ) -> list[Any]:
        n = self._names
        keys = [
            n.rate(tenant.name, "req"),
            n.rate(tenant.name, "tok"),
            n.rate(tenant.name, "amt"),
            n.rate(tenant.name, "sum"),
            n.inflight(tenant.name),
            stream,
        ]
        args: list[str | int] = [
            request_id,
            tokens,
            tenant.rpm or 0,
            tenant.tpm or 0,
            tenant.max_concurrent or 0,
            tenant.max_backlog or 0,
            WINDOW_MS,
            self._ttl_ms,
            jobs,
        ]
        if enqueue is not None:
            keys += enqueue.keys[1:]
            args += enqueue.args
        try:
            [result] = await self._batch.run(["EVALSHA", script.sha, len(keys), *keys, *args])
            if is_noscript(result):  # Redis restarted empty: the script loads itself and runs
                result = await script(keys=keys, args=args)
            elif isinstance(result, Exception):
                raise result
            return list(result)
        except (RedisError, OSError) as exc:
            raise Unavailable(
                "rate limits cannot be checked: the queue is unreachable", retry_after=2
            ) from exc

    def _refused(
        self, tenant: Tenant, model: str, result: list[Any], jobs: int = 1, embedding: bool = False
    ) -> Exception:
        """Why admission (or its check before encoding) refused a request of ``jobs`` jobs, as the
        error its client gets; ``embedding``: its tokens are all input."""
        reason = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        wait_ms, req_used, tok_used = int(result[2]), int(result[3]), int(result[4])
        headers = limit_headers(tenant, req_used, tok_used, wait_ms, wait_ms)
        if reason == "tokens_too_many":
            return InvalidRequest(
                f"this request needs more tokens than tenant '{tenant.name}' may use in a minute "
                f"({tenant.tpm}); "
                + ("send fewer or shorter inputs" if embedding else "lower max_tokens or the prompt"),
                param="input" if embedding else "max_tokens",
                code="tokens_exceed_limit",
            )
        if reason == "backlog":
            return RateLimited(
                f"tenant '{tenant.name}' already has {tenant.max_backlog} requests queued or running"
                if jobs == 1
                else f"tenant '{tenant.name}' has no room for {jobs} more jobs in its backlog "
                f"({tenant.max_backlog} queued or running at most)",
                retry_after=self._drain.retry_after(model, jobs),
                code="backlog_full",
                headers=headers,
            )
        what = {
            "requests": "requests per minute",
            "tokens": "tokens per minute",
            "concurrency": "concurrent requests",
        }[reason]
        code = "concurrency_limit_exceeded" if reason == "concurrency" else "rate_limit_exceeded"
        return RateLimited(
            f"Rate limit reached for tenant '{tenant.name}' on {what}.",
            retry_after=wait_ms / 1000,
            code=code,
            headers=headers,
        )

    async def settle(self, ticket: Ticket, usage: Usage, served: UsageEvent | None = None) -> None:
        """The request ended having used ``usage``: free its concurrency slot, refund the rest.
        A request that was served (not only admitted) is logged for the tenant's usage roll-ups
        in the same round trip, and requests that end together share it (:mod:`serving.pipelined`).
        Never raises: without Redis the slot expires by itself."""
        n = self._names
        keys = [n.rate(ticket.tenant, "amt"), n.rate(ticket.tenant, "sum"), n.inflight(ticket.tenant)]
        args: list[str | int] = [ticket.request_id, usage.total_tokens]
        release = self._scripts.release
        commands: list[list[Any]] = [["EVALSHA", release.sha, len(keys), *keys, *args]]
        if served is not None:
            commands.append(
                ["XADD", n.usage_log(), "MAXLEN", "~", USAGE_LOG_BOUND, "*", *_flat(served.fields())]
            )
        try:
            # Shielded: a caller cancelled meanwhile leaves its settlement to finish without it.
            released, *_ = await asyncio.shield(self._batch.run(*commands))
            if is_noscript(released):  # Redis restarted empty: load it and release again
                await release(keys=keys, args=args)
        except (RedisError, OSError) as exc:  # the slot expires by itself; log and move on
            log.warning("could not release %s: %s", ticket.request_id, exc)


def _flat(fields: dict[str, str | int]) -> list[str | int]:
    return [x for pair in fields.items() for x in pair]


class DrainMeter:
    """Each model's backlog and how fast workers finish jobs, from the fleet snapshots the gateway's
    probe reads every few seconds (see :mod:`gateway.probe`).

    Its figures decide 503s, so figures older than ``stale_after`` seconds (Redis unreachable, the
    probe failing) count as unknown: no backlog, no rate.
    """

    def __init__(self, horizon: float = 30.0, stale_after: float = 10.0) -> None:
        self._horizon = horizon
        self._stale_after = stale_after
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._backlog: dict[str, tuple[float, int]] = {}

    def backlog(self, model: str) -> int:
        """Jobs waiting or running for ``model`` at the last sample (0 when unknown or stale)."""
        at, count = self._backlog.get(model, (float("-inf"), 0))
        return count if time.monotonic() - at <= self._stale_after else 0

    def rate(self, model: str) -> float:
        """Jobs finished per second recently (0 when unknown)."""
        samples = self._samples.get(model)
        if not samples or len(samples) < 2 or time.monotonic() - samples[-1][0] > self._stale_after:
            return 0.0
        (t0, v0), (t1, v1) = samples[0], samples[-1]
        return max(0.0, (v1 - v0) / (t1 - t0)) if t1 > t0 else 0.0

    def retry_after(self, model: str, excess: int) -> float:
        """Seconds until ``excess`` jobs have drained at the measured rate (1 to 60)."""
        rate = self.rate(model)
        if rate <= 0:
            return 10.0  # nothing finished lately: a cautious wait rather than a guess of zero
        return min(60.0, max(1.0, math.ceil(excess / rate)))

    def observe(self, snap: Snapshot) -> None:
        now = time.monotonic()
        for model in snap.models():
            self._backlog[model] = (now, snap.backlog(model))
            samples = self._samples.setdefault(model, deque())
            samples.append((now, snap.drained.get(model, 0)))
            while samples and now - samples[0][0] > self._horizon:
                samples.popleft()
