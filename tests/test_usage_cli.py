"""``switchyard usage`` and ``switchyard jobs`` from the command line: times, tables, one-line errors."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from control.processes import free_port
from control.redis_server import EmbeddedRedis
from control.usage import parse_since
from serving.usage import Usage
from shared.messages import UsageEvent
from shared.names import Names
from tests.test_cli import assert_one_line_error, switchyard

NOW = 1_764_684_000.0  # 2025-12-02 14:00 UTC


@pytest.mark.parametrize(
    ("text", "since"),
    [
        ("24h", NOW - 86400),
        ("90m", NOW - 5400),
        ("7d", NOW - 7 * 86400),
        ("30s", NOW - 30),
        ("1764000000", 1764000000),
        ("24", 24),  # a bare number is Unix seconds
        ("2025-12-01", datetime(2025, 12, 1, tzinfo=UTC).timestamp()),
        ("2025-12-01T08:30", datetime(2025, 12, 1, 8, 30, tzinfo=UTC).timestamp()),
        ("2025-12-01T08:30+01:00", datetime(2025, 12, 1, 7, 30, tzinfo=UTC).timestamp()),
    ],
)
def test_since_takes_durations_dates_and_unix_times(text: str, since: float) -> None:
    assert parse_since(text, NOW) == int(since)


@pytest.mark.parametrize("text", ["yesterday", "h", "-5m", "5 m"])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_since(text, NOW)


def test_usage_prints_each_tenants_hours(redis_server: EmbeddedRedis) -> None:
    prefix = "uc" + uuid.uuid4().hex[:8]

    async def log_and_roll_up() -> None:
        redis = Redis.from_url(redis_server.url)
        try:
            for tenant in ("acme", "zeta"):
                event = UsageEvent(tenant=tenant, model="m", prompt_tokens=3, completion_tokens=5)
                await redis.xadd(Names(prefix).usage_log(), event.fields())  # type: ignore[arg-type]
            await Usage(redis, Names(prefix), 90).roll_up()
        finally:
            await redis.aclose()

    asyncio.run(log_and_roll_up())
    env = {"REDIS_URL": redis_server.url, "SWITCHYARD_KEY_PREFIX": prefix}
    table = switchyard("usage", **env)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["tenant", "hour", "(UTC)"]
    assert [r.split()[0] for r in rows] == ["acme", "zeta"]
    assert rows[0].split()[-4:] == ["1", "0", "3", "5"]
    one = switchyard("usage", "--tenant", "zeta", "--json", **env)
    (bucket,) = json.loads(one.stdout)["zeta"]
    assert bucket["requests"] == 1 and bucket["start_time"] <= time.time()
    none = switchyard("usage", "--since", "2020-01-01", "--tenant", "nobody", **env)
    assert none.stdout.strip() == "no usage recorded in that time"
    assert_one_line_error(switchyard("usage", "--since", "last week", **env), "--since")


def test_jobs_errors_are_one_line() -> None:
    port = free_port()
    assert_one_line_error(
        switchyard("jobs", "--redis-url", f"redis://127.0.0.1:{port}/0"), "cannot reach Redis"
    )
    assert_one_line_error(
        switchyard("jobs", SWITCHYARD_HOUSEKEEPING_INTERVAL="7"), "housekeeping_interval", "divide a minute"
    )
