"""Prometheus metrics, for real: the gateway's /metrics, the worker's metrics port, and a gateway
running as several processes whose counters must add up."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from control.processes import free_port
from control.redis_server import EmbeddedRedis
from shared.messages import Failure, Started, decode_job, encode
from shared.names import JOB_FIELD
from tests.conftest import MAX_MODEL_LEN, System
from tests.procs import spawn, stop, wait_until
from tests.test_e2e_faults import fake_model, forget_model

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
EXACT = {"ignore_eos": True}
USER = [{"role": "user", "content": "count the ships"}]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).raise_for_status().text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def settle(url: str, done: Callable[[Samples], bool], timeout: float = 3.0) -> Samples:
    """Scrape until ``done`` holds: a request is counted just after its last byte reaches the client."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_gateway_metrics_count_requests_by_outcome(system: System, client: OpenAI) -> None:
    url = system.gateway_metrics_url
    model, mt = system.model, {"model": system.model, "tenant": "main"}
    before = scrape(url)
    prompt_tokens = 0
    for _ in range(2):
        resp = client.chat.completions.create(model=model, messages=USER, max_tokens=5, extra_body=EXACT)
        assert resp.usage is not None
        prompt_tokens += resp.usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=USER,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
    )
    assert chunks[-1].usage is not None
    prompt_tokens += chunks[-1].usage.prompt_tokens
    text = client.completions.create(model=model, prompt="harbour", max_tokens=5, extra_body=EXACT)
    assert text.usage is not None
    prompt_tokens += text.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=USER, max_tokens=MAX_MODEL_LEN * 2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model-" + uuid.uuid4().hex[:6], messages=USER)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok_chat = {**mt, "endpoint": "chat", "status": "200"}
    depth = ("switchyard:queue_depth", frozenset(mt.items()))
    after = settle(
        url,
        lambda s: (
            value(s, "switchyard:requests_total", **ok_chat)
            >= value(before, "switchyard:requests_total", **ok_chat) + 3
            and depth in s  # the queue gauges follow within one probe period (2 s)
        ),
        timeout=5,
    )
    assert delta("switchyard:requests_total", **ok_chat) == 3
    assert delta("switchyard:requests_total", **mt, endpoint="completions", status="200") == 1
    assert delta("switchyard:requests_total", **mt, endpoint="chat", status="400") == 1
    assert (
        delta("switchyard:requests_total", model="unknown", tenant="main", endpoint="chat", status="404") == 1
    )
    assert delta("switchyard:rejections_total", reason="context_length") == 1
    assert delta("switchyard:rejections_total", reason="model_not_found") == 1
    assert delta("switchyard:generation_tokens_total", **mt) == 20
    assert delta("switchyard:prompt_tokens_total", **mt) == prompt_tokens
    for histogram in (
        "switchyard:time_to_first_token_seconds",
        "switchyard:e2e_request_latency_seconds",
        "switchyard:time_per_output_token_seconds",
        "switchyard:request_queue_time_seconds",
    ):
        assert delta(f"{histogram}_count", **mt) == 4, histogram
        assert delta(f"{histogram}_sum", **mt) > 0, histogram
    assert value(after, "switchyard:requests_in_flight", model=model) == 0
    assert value(after, "switchyard:redis_up") == 1
    assert value(after, "switchyard:live_workers", model=model) >= 1
    assert depth in after
    assert (("switchyard:dead_letter_jobs", frozenset({("model", model)}))) in after
    assert value(after, "process_resident_memory_bytes") > 0
    assert sum(v for (n, _), v in after.items() if n == "switchyard:request_errors_total") == sum(
        v for (n, _), v in before.items() if n == "switchyard:request_errors_total"
    )


def rejected_in(samples_file: Path) -> float:
    """How many model_not_found rejections one gateway process wrote to its own sample file."""
    return sum(
        value
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(samples_file))
        if '"switchyard:rejections_total"' in key and '"model_not_found"' in key
    )


def test_worker_metrics_port_serves_worker_and_vllm_metrics(system: System, client: OpenAI) -> None:
    model = {"model": system.model}
    before = scrape(system.worker_metrics_url)
    client.chat.completions.create(model=system.model, messages=USER, max_tokens=7, extra_body=EXACT)
    after = settle(
        system.worker_metrics_url,
        lambda s: (
            value(s, "switchyard:worker_jobs_total", **model, outcome="completed")
            > value(before, "switchyard:worker_jobs_total", **model, outcome="completed")
        ),
    )
    done = {**model, "outcome": "completed"}
    assert (
        value(after, "switchyard:worker_jobs_total", **done)
        - value(before, "switchyard:worker_jobs_total", **done)
        == 1
    )
    tokens = "switchyard:worker_generation_tokens_total"
    assert value(after, tokens, **model) - value(before, tokens, **model) == 7
    published = "switchyard:worker_messages_published_total"
    assert value(after, published, **model) - value(before, published, **model) >= 3  # start, tokens, final
    assert value(after, "switchyard:worker_jobs_running", **model) == 0
    assert value(after, "switchyard:worker_queue_time_seconds_count", **model) > value(
        before, "switchyard:worker_queue_time_seconds_count", **model
    )
    names = {name for name, _ in after}
    for vllm in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:generation_tokens_total",
    ):
        assert vllm in names, vllm
    assert "process_cpu_seconds_total" in names


async def test_gateway_processes_add_up_their_counters(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    port, metrics_port, samples_dir = free_port(), free_port(), tmp_path / "prom"
    samples_dir.mkdir()
    env = {
        "REDIS_URL": redis_server.url,
        "SWITCHYARD_KEY_PREFIX": "mp-" + uuid.uuid4().hex[:6],
        "SWITCHYARD_PORT": str(port),
        "SWITCHYARD_METRICS_PORT": str(metrics_port),
        "SWITCHYARD_PROCESSES": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(samples_dir),
        "SWITCHYARD_AUTH": "false",  # every request is tenant 'default'
    }
    base, log = f"http://127.0.0.1:{port}", tmp_path / "gateway.log"
    gateway = spawn("gateway", env, log)
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, "two gateway processes", procs=(gateway,), logs=(log,))
        body = {"model": "nobody-serves-this", "messages": USER}
        # A fresh connection per request, many at once, so both processes accept some; which one
        # accepts is the kernel's choice (and a process still starting takes none), so send bursts
        # until both have served.
        limits = httpx.Limits(max_keepalive_connections=0)
        sent, served = 0, {}
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as http:
            for _ in range(20):
                replies = await asyncio.gather(
                    *(http.post("/v1/chat/completions", json=body) for _ in range(30))
                )
                assert {r.status_code for r in replies} == {404}
                sent += len(replies)
                served = {f.name: rejected_in(f) for f in samples_dir.glob("counter_*.db")}
                if len(served) == 2 and all(served.values()):
                    break
        assert len(served) == 2 and all(served.values()), f"one process took all {sent} requests: {served}"
        for _ in range(4):  # whichever process answers the scrape reports the sum
            samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
            assert value(samples, "switchyard:rejections_total", reason="model_not_found") == sent
            labels = {"model": "unknown", "tenant": "default", "endpoint": "chat", "status": "404"}
            assert value(samples, "switchyard:requests_total", **labels) == sent
            assert value(samples, "switchyard:redis_up") == 1
            assert value(samples, "process_resident_memory_bytes") > 0
    finally:
        stop(gateway)


async def test_failure_after_admission_is_an_error_not_a_rejection(system: System, redis: Redis) -> None:
    """A worker that reports a failure (here: its wire protocol, spoken by the test) counts as an error."""
    model = "failing-" + uuid.uuid4().hex[:6]
    await fake_model(redis, system, model, live=True)
    await asyncio.sleep(0.6)  # past the gateway's registry cache
    url = system.gateway_metrics_url
    before = await asyncio.to_thread(scrape, url)
    body = {"model": model, "messages": USER}
    stream = system.names.jobs_stream(model, "main")
    try:
        async with httpx.AsyncClient(base_url=system.base_url, timeout=10, headers=system.headers) as http:
            call = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            entries = []
            for _ in range(200):  # the job reaches its stream once the gateway has enqueued it
                entries = await redis.xrange(stream)
                if entries:
                    break
                await asyncio.sleep(0.05)
            assert entries, "the gateway never enqueued the job"
            job = decode_job(entries[0][1][JOB_FIELD.encode()])
            channel = system.names.reply_channel(job.id)
            await redis.publish(channel, encode(Started(seq=0, worker="test", attempt=1)))
            failure = Failure(seq=1, status=503, code="worker_lost", message="the worker went away")
            await redis.publish(channel, encode(failure))
            reply = await call
    finally:
        await redis.delete(stream)
        await forget_model(redis, system, model)
    assert reply.status_code == 503
    labels = {"model": model, "tenant": "main"}
    after = await asyncio.to_thread(
        settle,
        url,
        lambda s: value(s, "switchyard:requests_total", **labels, endpoint="chat", status="503") == 1,
    )
    assert value(after, "switchyard:request_errors_total", **labels, code="worker_lost") == 1
    assert value(after, "switchyard:request_queue_time_seconds_count", **labels) == 1
    assert value(after, "switchyard:requests_in_flight", model=model) == 0
    rejections = {k: v for k, v in after.items() if k[0] == "switchyard:rejections_total"}
    assert rejections == {k: v for k, v in before.items() if k[0] == "switchyard:rejections_total"}
