"""Redis with a password, as Compose and Kubernetes run it: the password reaches every client (in
REDIS_URL, or apart in SWITCHYARD_REDIS_PASSWORD), and no message, log line or command line shows it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.cli import redis_cli_command
from control.redis_server import EmbeddedRedis
from shared.settings import GatewaySettings, RedisSettings, redact_url, split_credentials, with_password
from tests.procs import spawn, stop

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-Pa55/word"
"""With a character a URL must escape: the password apart and the one in a URL are the same."""


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://app:hunter2@redis.example:6380/1", "rediss://app:***@redis.example:6380/1"),
        ("redis://app@redis:6379/0", "redis://app@redis:6379/0"),
        ("redis://redis:6379/0?password=hunter2&db=2", "redis://redis:6379/0?password=***&db=2"),
        ("unix:///run/redis.sock?password=hunter2", "unix:///run/redis.sock?password=***"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_credentials_split_off_a_url() -> None:
    assert split_credentials("redis://app:p%40ss@redis:6379/0") == ("redis://redis:6379/0", "app", "p@ss")
    assert split_credentials("redis://:pw@redis:6379/0") == ("redis://redis:6379/0", None, "pw")
    assert split_credentials("redis://redis/0?password=pw&db=1") == ("redis://redis/0?db=1", None, "pw")
    assert split_credentials("redis://redis:6379/0") == ("redis://redis:6379/0", None, None)


def test_a_password_given_apart_goes_into_the_url_unless_it_has_one() -> None:
    assert with_password("redis://redis:6379/0", "a b/c") == "redis://:a%20b%2Fc@redis:6379/0"
    assert with_password("redis://app@redis:6379/0", "pw") == "redis://app:pw@redis:6379/0"
    assert with_password("redis://:own@redis:6379/0", "pw") == "redis://:own@redis:6379/0"
    settings = RedisSettings(redis_url="redis://redis:6379/0", redis_password=PASSWORD)
    assert split_credentials(settings.redis_url)[2] == PASSWORD
    # Children started with these settings find the password in REDIS_URL, and only there.
    env = settings.environment()
    assert split_credentials(env["REDIS_URL"])[2] == PASSWORD
    assert not any(PASSWORD in v for k, v in env.items() if k != "REDIS_URL")
    assert PASSWORD not in repr(settings) and PASSWORD not in str(GatewaySettings(redis_password=PASSWORD))
    assert RedisSettings(redis_url="redis://redis/0", redis_password="").redis_url == "redis://redis/0"


def test_redis_cli_takes_the_password_from_its_environment() -> None:
    argv, env = redis_cli_command("redis-cli", "redis://app:hunter2@redis:6379/0", ["XLEN", "s"])
    assert argv == ["redis-cli", "-u", "redis://redis:6379/0", "--user", "app", "XLEN", "s"]
    assert env == {"REDISCLI_AUTH": "hunter2"}
    argv, env = redis_cli_command("redis-cli", "redis://redis:6379/0", ["PING"])
    assert (argv, env) == (["redis-cli", "-u", "redis://redis:6379/0", "PING"], {})


@pytest.fixture(scope="module")
def locked() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(password=PASSWORD) as server:
        yield server


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_") and k != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "control.cli", *args],
        cwd=ROOT, env={**full, **env}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_cli_reaches_a_redis_that_wants_a_password(locked: EmbeddedRedis) -> None:
    bare = f"redis://127.0.0.1:{locked.port}/0"
    for env in ({"REDIS_URL": locked.url}, {"REDIS_URL": bare, "SWITCHYARD_REDIS_PASSWORD": PASSWORD}):
        done = _cli("redis-cli", "PING", env=env)
        assert done.stdout.strip() == "PONG", done.stderr
        done = _cli("keys", "list", env=env)
        assert done.returncode == 0, done.stderr
    refused = _cli("redis-cli", "PING", env={"REDIS_URL": bare})
    assert "NOAUTH" in refused.stdout + refused.stderr


def test_a_refused_password_is_not_in_the_message(locked: EmbeddedRedis) -> None:
    wrong = with_password(f"redis://127.0.0.1:{locked.port}/0", f"not-{PASSWORD}")
    for command in (["status"], ["keys", "list"], ["usage"]):
        done = _cli(*command, env={"REDIS_URL": wrong})
        assert done.returncode == 1, (command, done.stderr)
        assert f"127.0.0.1:{locked.port}" in done.stderr and ":***@" in done.stderr, done.stderr
        assert PASSWORD not in done.stderr + done.stdout, done.stderr
    # A password that breaks the URL (an unescaped "/") is not shown either.
    broken = _cli("status", env={"REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/0"})
    assert broken.returncode == 1 and "invalid setting" in broken.stderr, broken.stderr
    assert "Pa55" not in broken.stderr + broken.stdout, broken.stderr


def test_a_running_role_logs_where_redis_is_but_not_its_password(
    locked: EmbeddedRedis, tmp_path: Path
) -> None:
    """The background role names its Redis when it starts; its command line never holds the URL."""
    log = tmp_path / "background.log"
    proc = spawn("background", {"REDIS_URL": locked.url, "SWITCHYARD_KEY_PREFIX": "auth-test"}, log)
    try:
        deadline = time.monotonic() + 60
        while "batches and housekeeping on" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert f"redis://:***@127.0.0.1:{locked.port}/0" in text, text
        assert PASSWORD not in text
        assert PASSWORD not in " ".join(Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0"))
    finally:
        stop(proc)
    assert PASSWORD not in log.read_text()
