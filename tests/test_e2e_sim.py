"""A simulated-engine worker and a gateway as real processes, driven by the official SDK.

They run beside the session's system on the same Redis under a key prefix of their own, so the
session's vLLM worker never sees their jobs and theirs never sees the session's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from control.processes import free_port
from control.redis_server import EmbeddedRedis
from shared.names import Names
from shared.tenants import Tenant
from tests.conftest import create_tenant
from tests.procs import ready, spawn, stop, wait_until

pytestmark = pytest.mark.e2e

MODEL = "switchyard-demo"
EXACT = {"ignore_eos": True}
MESSAGES: Any = [{"role": "user", "content": "How are you today?"}]


@pytest.fixture(scope="module")
def sim(
    redis_server: EmbeddedRedis, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpenAI]:
    names = Names(f"sytest-sim-{uuid.uuid4().hex[:8]}")
    key = asyncio.run(create_tenant(redis_server.url, names, Tenant(name="sim")))
    port = free_port()
    env = {"REDIS_URL": redis_server.url, "SWITCHYARD_KEY_PREFIX": names.prefix}
    logs = tmp_path_factory.mktemp("sim-logs")
    worker_log, gateway_log = logs / "worker.log", logs / "gateway.log"
    worker = spawn(
        "worker",
        {**env, "SWITCHYARD_MODEL": str(demo_model_dir), "SWITCHYARD_SERVED_MODEL_NAME": MODEL},
        worker_log,
        *("--engine", "sim", "--sim-preset", "cpu-demo", "--capacity", "8"),
    )
    gateway = spawn("gateway", {**env, "SWITCHYARD_PORT": str(port)}, gateway_log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: ready(base_url),
            60,
            "simulated worker and gateway ready",
            procs=(worker, gateway),
            logs=(worker_log, gateway_log),
        )
        yield OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)
    finally:
        stop(gateway)
        stop(worker)


@pytest.fixture(scope="module")
def prompt_tokens(demo_model_dir: Path) -> int:
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir))
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_models_report_the_engine(sim: OpenAI, client: OpenAI) -> None:
    (card,) = sim.models.list().data
    assert (card.id, card.model_extra) == (MODEL, {"max_model_len": 4096, "engine": "sim"})
    assert sim.models.retrieve(MODEL).model_extra == {"max_model_len": 4096, "engine": "sim"}
    real = client.models.list().data
    assert [m.model_extra and m.model_extra["engine"] for m in real] == ["vllm"]


def test_a_completion_has_exactly_max_tokens(sim: OpenAI, prompt_tokens: int) -> None:
    reply = sim.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, extra_body=EXACT)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 40)
    assert reply.usage.total_tokens == prompt_tokens + 40


def test_a_stream_has_exactly_max_tokens(sim: OpenAI, prompt_tokens: int) -> None:
    chunks = list(
        sim.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert finishes == ["length"] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, 50)
    assert text.replace(" ", "").isalpha()  # pieces of words from the model's vocabulary


def test_several_choices_and_a_natural_end(sim: OpenAI) -> None:
    reply = sim.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, n=3, extra_body=EXACT)
    assert [c.finish_reason for c in reply.choices] == ["length"] * 3
    assert reply.usage is not None and reply.usage.completion_tokens == 72
    ended = sim.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4000, seed=3)
    assert ended.choices[0].finish_reason == "stop"
    assert ended.usage is not None and 0 < ended.usage.completion_tokens < 4000


def test_an_idle_worker_leaves_promptly_on_sigterm(
    redis_server: EmbeddedRedis, demo_model_dir: Path, tmp_path: Path
) -> None:
    """A SIGTERM sets the stop event and cancels the heartbeat at once; a cancellation lost in
    that race (Python 3.11's wait_for drops it) once left workers running forever."""
    import signal
    import time

    env = {"REDIS_URL": redis_server.url, "SWITCHYARD_KEY_PREFIX": f"sytest-term-{uuid.uuid4().hex[:8]}"}
    env |= {"SWITCHYARD_MODEL": str(demo_model_dir), "SWITCHYARD_HEARTBEAT_INTERVAL": "0.2"}
    for attempt in range(3):
        log = tmp_path / f"worker-{attempt}.log"
        worker = spawn("worker", env, log, "--engine", "sim", "--sim-preset", "cpu-demo")
        try:
            serving = lambda log=log: "serving" in log.read_text()  # noqa: E731
            wait_until(serving, 60, "the worker serving", (worker,), (log,))
            time.sleep(0.35)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=15) == 0, log.read_text()[-2000:]
        finally:
            stop(worker)
