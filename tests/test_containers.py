"""The Compose stack for real: the image built from the Dockerfile, compose.yaml brought up with
podman-compose (Redis, gateway, one worker on the demo model, the background service, Prometheus), and the
system used through its published port the way the README tells users to.

Workers are added by starting containers (``--scale worker=3``) and load spreads over them; a worker
container killed with SIGKILL mid-stream costs no stream (another worker resumes each one) and its
restart policy brings it back; the background container runs a batch; Prometheus scrapes every target; a
gateway container told to stop drains its streams. The stack runs as shipped: Redis wants a password
(the test makes one), only the gateway's API port is published and serves no metrics, and every
container runs as a user other than root with no capabilities and a read-only root file system.
Where no registry is reachable, which is the case here, deploy/images.sh builds every image from
Debian's packages.

Needs root, podman and podman-compose (and debootstrap unless its base image exists); skipped
without them unless SWITCHYARD_REQUIRE_CONTAINERS=1 (CI), where it fails instead. It prints the
build times, the image size and the time from ``up`` to the first token.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from control.processes import free_port
from tests.compose_stack import ROOT, Container, Stack, clean_env, containers_conf, podman_compose
from tests.procs import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

MODEL = "switchyard-demo"
BASE = "localhost/switchyard-python:3.11-bookworm"
IMAGE = "localhost/switchyard:latest"
LONG = 1500
"""Tokens of a stream that must still be running when its worker dies: the demo model's context is
2048, and a few thousand tokens/s spread over dozens of streams keep each going for many seconds."""
DRAINED = 600
"""Tokens of the streams open when the gateway is told to stop: still running then, and on an idle
host done well within its 30 s grace (a host busy with other work may need longer: they are cut)."""
RECLAIM_IDLE = 15.0
"""compose.yaml leaves SWITCHYARD_RECLAIM_IDLE at its default: a dead worker's jobs wait this long."""
REDIS_PASSWORD = secrets.token_hex(24)
SERVICES = ("redis", "gateway", "worker", "background", "prometheus")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the container tests run podman as root"
    for tool in ("podman", "runc", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install podman runc iptables)"
    if podman_compose() is None:
        return "podman-compose not installed (the dev extra has it)"
    has_base = subprocess.run(["podman", "image", "exists", BASE], check=False).returncode == 0
    if not has_base and shutil.which("debootstrap") is None:
        return "no base image and no debootstrap to build one (apt-get install debootstrap)"
    return None


@pytest.fixture(scope="module")
def figures() -> Iterator[dict[str, str]]:
    """What the run measured, printed at its end."""
    found: dict[str, str] = {}
    yield found
    print("\ncontainer figures: " + "; ".join(f"{k} {v}" for k, v in found.items()))


def _build(stack: Stack, figures: dict[str, str]) -> None:
    """Every image, timed. The base is built once per host (debootstrap has no cache); the others
    are built every run, so the image under test holds this checkout (unchanged layers are cached)."""
    script = str(ROOT / "deploy" / "images.sh")
    had_base = subprocess.run(["podman", "image", "exists", BASE], check=False).returncode == 0
    had_image = subprocess.run(["podman", "image", "exists", IMAGE], check=False).returncode == 0
    begun = time.monotonic()
    exports = stack.run([script, "base"], timeout=1200)
    if not had_base:
        figures["base image from Debian"] = f"{time.monotonic() - begun:.0f} s"
    begun = time.monotonic()
    stack.run([script, "--rebuild", "redis", "prometheus"], timeout=1200)
    figures["Redis and Prometheus images"] = f"{time.monotonic() - begun:.0f} s"
    begun = time.monotonic()
    stack.run([script, "--rebuild", "switchyard"], timeout=3000)
    took = time.monotonic() - begun
    figures["Switchyard image build"] = f"{took:.0f} s ({'layers cached' if had_image else 'first build'})"
    size = int(stack.podman("image", "inspect", "--format", "{{.Size}}", IMAGE))
    figures["image size"] = f"{size / 1e9:.2f} GB"
    for line in exports.splitlines():  # export SWITCHYARD_..._IMAGE=...
        name, value = line.removeprefix("export ").split("=", 1)
        stack.env[name] = value


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, figures: dict[str, str]) -> Iterator[Stack]:
    missing = _missing()
    if missing is not None:
        if os.environ.get("SWITCHYARD_REQUIRE_CONTAINERS") == "1":
            pytest.fail(f"{missing}, and SWITCHYARD_REQUIRE_CONTAINERS=1")
        pytest.skip(missing)
    home = tmp_path_factory.mktemp("containers")
    gateway_port, prometheus_port = free_port(), free_port()
    env = clean_env(
        {
            "CONTAINERS_CONF": str(containers_conf(home / "containers.conf")),
            "SWITCHYARD_GATEWAY_PORT": str(gateway_port),
            "SWITCHYARD_PROMETHEUS_PORT": str(prometheus_port),
            # compose.yaml starts nothing without it (users keep it in .env).
            "SWITCHYARD_REDIS_PASSWORD": REDIS_PASSWORD,
        }
    )
    project = f"sytest-{uuid.uuid4().hex[:8]}"
    s = Stack(project, env, home / "stack.log", gateway_port, prometheus_port)
    print(f"\ncontainer stack {project}: log in {s.log}")
    _build(s, figures)
    try:
        s.started_at = time.monotonic()
        # Grafana is the one service without a Debian stand-in: everything else comes up.
        s.compose("up", "-d", "redis", "gateway", "worker", "background", "prometheus")
        yield s
    finally:
        s.remove()


@pytest.fixture(scope="module")
def api_key(stack: Stack) -> str:
    """A tenant's key, made the way compose.yaml says: ``switchyard keys create`` in the gateway."""
    found: list[str] = []

    def create() -> bool:
        out = stack.switchyard("keys", "create", "--tenant", "containers")
        found.append(out.strip().splitlines()[-1])  # the key, on a line of its own after the notice
        return True

    stack.wait(create, 120, "a key from `switchyard keys create` in the gateway container")
    return found[-1]


def _client(stack: Stack, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=300)


async def _stream(
    client: AsyncOpenAI, prompt: str, tokens: int, started: asyncio.Event | None = None
) -> tuple[str | None, int, float]:
    """(finish reason, completion tokens, longest pause between chunks) of one streamed chat."""
    chunks = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finish, used, last, longest = None, 0, None, 0.0
    async for chunk in chunks:
        now = time.monotonic()
        if started is not None:
            started.set()
        longest, last = (max(longest, now - last) if last else 0.0), now
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    return finish, used, longest


def _internal(stack: Stack, container: Container, path: str) -> str:
    """A page of a container's metrics port (9101), read inside it: no metrics port is published."""
    return stack.exec(
        container, "python", "-c",
        f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9101{path}').read().decode())",
    )  # fmt: skip


def _worker_metric(stack: Stack, worker: Container, line_start: str) -> float:
    """One sample of a worker's /metrics."""
    text = _internal(stack, worker, "/metrics")
    values = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line_start)]
    return sum(values)


COMPLETED = 'switchyard:worker_jobs_total{model="switchyard-demo",outcome="completed"}'


def test_up_streams_a_chat_completion(stack: Stack, api_key: str, figures: dict[str, str]) -> None:
    def ready() -> bool:
        return httpx.get(f"{stack.base_url}/readyz", timeout=5).status_code == 200

    stack.wait(ready, 600, "the gateway ready with a worker behind it")
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)
    assert MODEL in [m.id for m in client.models.list().data]
    pieces, finish = [], None
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about the river."}],
        max_tokens=16,
        stream=True,
    ):
        if chunk.choices:
            if chunk.choices[0].delta.content and not "".join(pieces):
                figures["up to first token"] = f"{time.monotonic() - stack.started_at:.0f} s"
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish in ("stop", "length") and "".join(pieces)
    # compose.yaml's healthchecks ask the right question. podman without systemd schedules none
    # (depends_on's service_healthy is ignored with a warning there); run each once by hand.
    for service in ("redis", "gateway", "worker"):
        stack.podman("healthcheck", "run", stack.container(service).id)


def test_the_stack_shows_little_and_runs_unprivileged(stack: Stack, api_key: str) -> None:
    """Only the API is published, and it serves no metrics; Redis wants its password, which no
    command line shows; every container runs as a user other than root, with no capability, on a
    read-only root file system."""
    assert httpx.get(f"{stack.base_url}/metrics", timeout=5).status_code == 404
    assert httpx.get(f"{stack.base_url}/readyz", timeout=5).json() == {"status": "ready"}
    refused = stack.exec(stack.container("redis"), "env", "-u", "REDISCLI_AUTH", "redis-cli", "ping")
    assert "NOAUTH" in refused, refused
    for service in SERVICES:
        container = stack.container(service)
        (inspected,) = json.loads(stack.podman("inspect", container.id))
        assert inspected["HostConfig"]["ReadonlyRootfs"] is True, service
        assert not inspected.get("EffectiveCaps"), (service, inspected.get("EffectiveCaps"))
        assert stack.exec(container, "id", "-u").strip() != "0", service
        # podman top: every process of the container with its command line.
        assert REDIS_PASSWORD not in stack.podman("top", container.id, "args"), service
        published = {
            binding["HostIp"] or "0.0.0.0"
            for bindings in (inspected["HostConfig"].get("PortBindings") or {}).values()
            for binding in bindings or ()
        }
        expected = {"gateway": {"0.0.0.0"}, "prometheus": {"127.0.0.1"}}.get(service, set())
        assert published == expected, (service, published)


def test_scaling_adds_workers_by_starting_containers(stack: Stack, api_key: str) -> None:
    stack.compose("up", "-d", "--scale", "worker=3", "worker")
    workers = stack.containers("worker")
    assert len(workers) == 3 and all(w.state == "running" for w in workers), workers
    stack.wait(lambda: len(stack.live_workers(MODEL)) == 3, 600, "three live workers in `switchyard status`")

    def counted() -> bool:
        scaling = json.loads(_internal(stack, stack.container("gateway"), f"/scaling?model={MODEL}"))
        return bool(scaling["workers"] == 3)

    stack.wait(counted, 60, "the gateway's /scaling counting three workers")
    status = stack.switchyard("status")
    assert f"model {MODEL}: 3 live worker(s)" in status, status


async def test_a_load_of_48_streams_spreads_over_the_workers(stack: Stack, api_key: str) -> None:
    workers = stack.containers("worker")
    before = [_worker_metric(stack, w, COMPLETED) for w in workers]
    async with _client(stack, api_key) as client:
        results = await asyncio.gather(*(_stream(client, f"story {i}", 200) for i in range(48)))
    assert Counter((f, n) for f, n, _ in results) == Counter({("length", 200): 48}), results
    ran = [_worker_metric(stack, w, COMPLETED) - b for w, b in zip(workers, before, strict=True)]
    print(f"\n48 streams: jobs per worker container {ran}")
    assert sum(ran) >= 48 and all(n > 0 for n in ran), ran


async def test_a_killed_worker_container_loses_no_stream_and_comes_back(stack: Stack, api_key: str) -> None:
    started = [asyncio.Event() for _ in range(48)]
    async with _client(stack, api_key) as client:
        streams = [asyncio.create_task(_stream(client, f"tale {i}", LONG, e)) for i, e in enumerate(started)]
        async with asyncio.timeout(120):
            await asyncio.gather(*(e.wait() for e in started))
        # The busiest worker by its heartbeat; its container by the hostname in the worker's id.
        holding = {w["id"]: w["inflight"] for w in await asyncio.to_thread(stack.live_workers, MODEL)}
        victim_id = max(holding, key=holding.__getitem__)
        victim = next(c for c in stack.containers("worker") if victim_id.startswith(c.id[:12]))
        assert holding[victim_id] > 0, holding
        # SIGKILL from the host to the container's init, as the OOM killer or a crash would end it:
        # `podman kill` would count as stopped by the user, which no restart policy undoes.
        os.kill(victim.pid, 9)
        killed = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*streams), 300)
    assert Counter((f, n) for f, n, _ in results) == Counter({("length", LONG): 48}), results
    pause = max(p for _, _, p in results)
    print(
        f"\nkilled a worker container holding {holding[victim_id]} of 48 streams: longest pause {pause:.1f} s"
    )
    assert pause < RECLAIM_IDLE + 30

    def restarted() -> bool:
        again = next(c for c in stack.containers("worker") if c.id == victim.id)
        return again.state == "running" and again.restarts > victim.restarts

    stack.wait(restarted, 60, "the killed worker's container restarted by its restart policy")
    back = stack.wait(lambda: len(stack.live_workers(MODEL)) == 3, 600, "three live workers again")
    print(
        f"the worker was serving again {time.monotonic() - killed:.0f} s after the kill ({back:.0f} s waited)"
    )


def test_the_background_container_runs_a_batch(stack: Stack, api_key: str) -> None:
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0, timeout=60)
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"hello {i}"}],
                "max_tokens": 4,
            },
        }
        for i in range(5)
    ]
    upload = client.files.create(
        file=("batch.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def finished() -> bool:
        nonlocal batch
        batch = client.batches.retrieve(batch.id)
        return batch.status in ("completed", "failed", "expired", "cancelled")

    stack.wait(finished, 180, "the batch finished by the background container")
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    output = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in output) == [f"line-{i}" for i in range(5)]
    assert all(x["response"]["status_code"] == 200 for x in output), output


def test_prometheus_scrapes_every_target(stack: Stack) -> None:
    """One gateway and three workers, found through the compose network's DNS, all up."""
    seen: dict[str, list[str]] = {}

    def all_up() -> bool:
        targets = httpx.get(f"{stack.prometheus_url}/api/v1/targets", timeout=5).json()["data"][
            "activeTargets"
        ]
        seen.clear()
        for t in targets:
            seen.setdefault(t["labels"]["job"], []).append(t["health"])
        return seen.get("switchyard-gateway") == ["up"] and seen.get("switchyard-worker") == ["up"] * 3

    stack.wait(all_up, 120, lambda: f"Prometheus scraping a gateway and three workers (seen {seen})", 2)
    query = httpx.get(
        f"{stack.prometheus_url}/api/v1/query", params={"query": "count(up == 1)"}, timeout=5
    ).json()
    assert query["data"]["result"][0]["value"][1] == "4", query


async def test_a_stopped_gateway_container_drains_its_streams(stack: Stack, api_key: str) -> None:
    gateway = stack.container("gateway")
    started = [asyncio.Event() for _ in range(16)]
    outcomes: list[str] = []

    async def one(client: AsyncOpenAI, i: int) -> None:
        try:
            finish, used, _ = await _stream(client, f"drain {i}", DRAINED, started[i])
        except openai.APIError as exc:  # an SSE error event: cut, and the client is told
            outcomes.append(f"error: {exc}")
            return
        outcomes.append(f"{finish} {used}" if finish else "silent")

    async with _client(stack, api_key) as client:
        streams = [asyncio.create_task(one(client, i)) for i in range(16)]
        async with asyncio.timeout(120):
            await asyncio.gather(*(e.wait() for e in started))
        # `podman stop` sends SIGTERM (passed on by the container's init) and waits up to its timeout.
        stopper = threading.Thread(
            target=stack.podman, args=("stop", "-t", "45", gateway.id), kwargs={"timeout": 120}
        )
        stopper.start()
        told = time.monotonic()
        async with httpx.AsyncClient(base_url=stack.base_url) as http:

            async def unready() -> bool:
                reply = await http.get("/readyz", timeout=5)
                return reply.status_code == 503 and reply.json()["reason"] == "shutting down"

            await wait_for(unready, 20, "/readyz answering 503 'shutting down'")
        await asyncio.wait_for(asyncio.gather(*streams), 120)
        ended = time.monotonic() - told
        await asyncio.to_thread(stopper.join)
    assert len(outcomes) == 16, outcomes
    # Each stream finished whole, or was cut with the gateway's error event saying so.
    assert all(o == f"length {DRAINED}" or "stopped before the request finished" in o for o in outcomes), (
        outcomes
    )
    counts = Counter(o.split(":")[0] for o in outcomes)
    print(f"\ngateway told to stop with 16 streams open: {dict(counts)}, the last ended {ended:.1f} s later")
    stopped = stack.container("gateway")
    assert stopped.state == "exited" and stopped.exit_code == 0, stopped
