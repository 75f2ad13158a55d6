"""The ``switchyard`` command: one-line start-up errors, and ``up`` from start to a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from control.processes import free_port
from control.redis_server import EmbeddedRedis
from tests.procs import ROOT, ready, wait_until


def switchyard(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_") and k != "REDIS_URL"}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "control.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
        cwd=ROOT,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("switchyard: error: ")
    for word in words:
        assert word in last


def test_unreachable_redis_is_one_line() -> None:
    port = free_port()
    assert_one_line_error(
        switchyard("gateway", "--redis-url", f"redis://127.0.0.1:{port}/0"), "cannot reach Redis", str(port)
    )
    assert_one_line_error(
        switchyard("worker", "--redis-url", f"redis://127.0.0.1:{port}/0"), "cannot reach Redis"
    )


def test_taken_port_is_one_line(redis_server: EmbeddedRedis) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = switchyard("gateway", "--port", str(port), "--redis-url", redis_server.url)
    assert_one_line_error(result, f"port {port}", "already in use")


def test_missing_model_path_is_one_line(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    assert_one_line_error(
        switchyard("worker", "--model", str(missing), "--redis-url", redis_server.url), "does not exist"
    )
    assert_one_line_error(
        switchyard(
            "up", "--model", str(missing), "--port", str(free_port()), "--redis-port", str(free_port())
        ),
        "does not exist",
    )


def test_invalid_setting_is_one_line() -> None:
    assert_one_line_error(switchyard("worker", "--capacity", "0"), "capacity")


def test_build_demo_model(tmp_path: Path) -> None:
    result = switchyard("model", "build-demo", str(tmp_path / "m"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "config.json").exists()
    assert (tmp_path / "m" / "tokenizer.json").exists()


@pytest.mark.e2e
def test_up_serves_and_stops_cleanly(demo_model_dir: Path, tmp_path: Path) -> None:
    port, redis_port = free_port(), free_port()
    log = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_") and k != "REDIS_URL"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # a fresh development key, not the user's
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "control.cli",
                "up",
                "--port",
                str(port),
                "--redis-port",
                str(redis_port),
                "--model",
                str(demo_model_dir),
                "--served-model-name",
                "up-demo",
                "--max-model-len",
                "512",
                "--kv-cache-gib",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(base), 300, "switchyard up", procs=(proc,), logs=(log,))
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 4  # redis, gateway, worker, vLLM's engine process
        key = (tmp_path / "config" / "switchyard" / "dev-key").read_text().strip()
        client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(
            model="up-demo",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        wait_until(lambda: "Press Ctrl-C to stop." in log.read_text(), 10, "banner")
        assert f"{base}/v1" in log.read_text()
        assert key in log.read_text()  # printed for the user to paste
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"orphans left behind: {alive}"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", redis_port)) != 0  # the embedded Redis is gone
