"""``switchyard usage``: tenants' rolled-up usage per hour and model, read from Redis."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime

from redis.asyncio import Redis
from redis.exceptions import RedisError

from serving.usage import Usage, UsageRow
from shared.settings import GatewaySettings, redact_url

DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> int:
    """``--since``: a duration back from now (``90m``, ``24h``, ``7d``), a date or date-time in UTC
    (``2026-12-01``, ``2026-12-01T08:00``), or Unix seconds. Raises ValueError."""
    text = text.strip()
    if match := DURATION.match(text):
        return int(now - int(match[1]) * UNITS[match[2]])
    if text.isdigit():
        return int(text)
    at = datetime.fromisoformat(text)
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp())


def render(rows: dict[str, list[UsageRow]]) -> str:
    """One table: tenant, hour (UTC), model, requests, errors, prompt and completion tokens."""
    headers = ["tenant", "hour (UTC)", "model", "requests", "errors", "prompt", "completion"]
    table = [
        [
            tenant,
            datetime.fromtimestamp(r.start_time, UTC).strftime("%Y-%m-%d %H:00"),
            r.model,
            str(r.requests),
            str(r.errors),
            str(r.prompt_tokens),
            str(r.completion_tokens),
        ]
        for tenant, found in sorted(rows.items())
        for r in found
    ]
    if not table:
        return "no usage recorded in that time"
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines)


def as_json(rows: dict[str, list[UsageRow]]) -> str:
    return json.dumps({tenant: [r.as_bucket() for r in found] for tenant, found in sorted(rows.items())})


def run_usage(settings: GatewaySettings, tenant: str | None, since: int, as_json_out: bool) -> str:
    async def read() -> dict[str, list[UsageRow]]:
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10)
        try:
            usage = Usage(redis, settings.names, settings.usage_retention_days)
            tenants = [tenant] if tenant else await usage.tenants()
            return {t: await usage.read(t, since) for t in tenants}
        except (RedisError, OSError) as exc:
            raise ConnectionError(f"cannot read Redis at {redact_url(settings.redis_url)}: {exc}") from exc
        finally:
            await redis.aclose()

    rows = asyncio.run(read())
    return as_json(rows) if as_json_out else render(rows)
