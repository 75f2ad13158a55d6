"""Admission: per-tenant rate limits and backlog caps (atomic in Redis), and a bound on the total
backlog with a Retry-After derived from how fast workers are actually draining it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import InvalidRequest, RateLimited, Unavailable
from shared.names import Names
from shared.scripts import Scripts
from shared.tenants import Tenant

WINDOW_MS = 60_000

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request: what it reserved and the rate-limit headers to send back."""

    tenant: str
    request_id: str
    reserved_tokens: int
    headers: dict[str, str]


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

    async def admit(self, tenant: Tenant, request_id: str, model: str, tokens: int) -> Ticket:
        """Reserve the request's slot and tokens, or raise 429/503 (fail closed without Redis)."""
        backlog = self._drain.backlog(model)
        if backlog >= self._max_total:
            raise Unavailable(
                "the system is at capacity; retry later",
                retry_after=self._drain.retry_after(model, backlog - self._max_total + 1),
                code="overloaded",
            )
        n = self._names
        keys = [
            n.rate(tenant.name, "req"),
            n.rate(tenant.name, "tok"),
            n.rate(tenant.name, "amt"),
            n.rate(tenant.name, "sum"),
            n.inflight(tenant.name),
            n.jobs_stream(model, tenant.name),
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
        ]
        try:
            result = await self._scripts.admit(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise Unavailable(
                "rate limits cannot be checked: the queue is unreachable", retry_after=2
            ) from exc
        if int(result[0]) == 1:
            _, req_used, tok_used, reset_req, reset_tok = (int(x) for x in result)
            return Ticket(
                tenant.name,
                request_id,
                tokens,
                limit_headers(tenant, req_used, tok_used, reset_req, reset_tok),
            )
        reason = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        wait_ms, req_used, tok_used = int(result[2]), int(result[3]), int(result[4])
        raise self._rejection(
            tenant, model, reason, wait_ms, limit_headers(tenant, req_used, tok_used, wait_ms, wait_ms)
        )

    def _rejection(
        self, tenant: Tenant, model: str, reason: str, wait_ms: int, headers: dict[str, str]
    ) -> Exception:
        if reason == "tokens_too_many":
            return InvalidRequest(
                f"this request needs more tokens than tenant '{tenant.name}' may use in a minute "
                f"({tenant.tpm}); lower max_tokens or the prompt",
                param="max_tokens",
                code="tokens_exceed_limit",
            )
        if reason == "backlog":
            return RateLimited(
                f"tenant '{tenant.name}' already has {tenant.max_backlog} requests queued or running",
                retry_after=self._drain.retry_after(model, 1),
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

    async def release(self, ticket: Ticket, used_tokens: int) -> None:
        n = self._names
        keys = [n.rate(ticket.tenant, "amt"), n.rate(ticket.tenant, "sum"), n.inflight(ticket.tenant)]
        try:
            await self._scripts.release(keys=keys, args=[ticket.request_id, used_tokens])
        except (RedisError, OSError) as exc:  # the slot expires by itself; log and move on
            log.warning("could not release %s: %s", ticket.request_id, exc)


class DrainMeter:
    """Samples each model's backlog and finished-job counter every few seconds."""

    def __init__(self, redis: Redis, names: Names, period: float = 2.0, horizon: float = 30.0) -> None:
        self._redis = redis
        self._names = names
        self._period = period
        self._horizon = horizon
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self._backlog: dict[str, int] = {}

    def backlog(self, model: str) -> int:
        return self._backlog.get(model, 0)

    def rate(self, model: str) -> float:
        """Jobs finished per second recently (0 when unknown)."""
        samples = self._samples.get(model)
        if not samples or len(samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = samples[0], samples[-1]
        return max(0.0, (v1 - v0) / (t1 - t0)) if t1 > t0 else 0.0

    def retry_after(self, model: str, excess: int) -> float:
        """Seconds until ``excess`` jobs have drained at the measured rate (1 to 60)."""
        rate = self.rate(model)
        if rate <= 0:
            return 10.0  # nothing finished lately: a cautious wait rather than a guess of zero
        return min(60.0, max(1.0, math.ceil(excess / rate)))

    async def sample(self, models: list[str]) -> None:
        now = time.monotonic()
        for model in models:
            streams = await self._redis.hkeys(self._names.streams_index(model))  # type: ignore[misc]
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._names.drained(model))
                for s in streams:
                    pipe.xlen(s)
                done, *lengths = await pipe.execute()
            self._backlog[model] = sum(int(x) for x in lengths)
            samples = self._samples.setdefault(model, deque())
            samples.append((now, int(done or 0)))
            while samples and now - samples[0][0] > self._horizon:
                samples.popleft()

    async def run(self, models: Callable[[], Awaitable[Iterable[str]]]) -> None:
        while True:
            try:
                await self.sample(list(await models()))
            except (RedisError, OSError) as exc:
                log.debug("drain sampling failed: %s", exc)
            await asyncio.sleep(self._period)
