"""Worker process: start the engine, register, pull jobs until SIGTERM, drain, leave."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.messages import Sampling, WorkerInfo
from shared.settings import WorkerSettings, redact_url
from worker.consumer import Consumer
from worker.engine import Engine
from worker.health import Health
from worker.heartbeat import Heartbeat
from worker.metrics import MetricsServer, WorkerMetrics

if TYPE_CHECKING:
    from worker.sim_shapes import Shaping

log = logging.getLogger(__name__)


class WorkerStartError(RuntimeError):
    """A problem a user can fix (model path, Redis address); reported as one line."""


DEMO_MODELS = ("demo", "demo-embed")


def resolve_model(model: str, served_name: str | None) -> tuple[str, str | None]:
    """Map 'demo' and 'demo-embed' to the offline demo models (built on first use); check local
    paths exist."""
    if model == "demo":
        from worker.demo_model import DEMO_MODEL_NAME, ensure_demo_model

        return str(ensure_demo_model()), served_name or DEMO_MODEL_NAME
    if model == "demo-embed":
        from worker.demo_model import DEMO_EMBEDDING_MODEL_NAME, ensure_demo_embedding_model

        return str(ensure_demo_embedding_model()), served_name or DEMO_EMBEDDING_MODEL_NAME
    looks_local = model.startswith(("/", ".", "~")) or (os.path.sep in model and Path(model).exists())
    if looks_local and not Path(model).expanduser().is_dir():
        raise WorkerStartError(f"model path {model} does not exist")
    return str(Path(model).expanduser()) if looks_local else model, served_name


async def check_redis(redis: Redis, url: str) -> None:
    try:
        async with asyncio.timeout(5):
            await redis.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        raise WorkerStartError(f"cannot reach Redis at {redact_url(url)}: {exc}") from exc


DEMO_KV_CACHE_GIB = 1.0
WARM_UP_PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)
WARM_UP_SAMPLING = Sampling(max_tokens=4, ignore_eos=True)


async def start_engine(settings: WorkerSettings) -> Engine:
    """vLLM on the configured model, or the simulated engine with the model's tokenizer."""
    # Building the demo model on first use takes seconds: keep the loop free meanwhile.
    path, served = await asyncio.to_thread(resolve_model, settings.model, settings.served_model_name)
    if settings.engine == "sim":
        return await start_sim_engine(settings, path, served)
    kv_gib = settings.kv_cache_gib
    if kv_gib is None and settings.model in DEMO_MODELS:
        kv_gib = DEMO_KV_CACHE_GIB  # a few MB of model has no use for most of the host's memory
    extra = {} if kv_gib is None else {"kv_cache_memory_bytes": int(kv_gib * 2**30)}
    from worker.vllm_embed import UnsupportedModel
    from worker.vllm_engine import VLLMEngine

    try:
        return await VLLMEngine.start(
            path,
            served_name=served,
            max_model_len=settings.max_model_len,
            dtype=settings.dtype,
            enforce_eager=settings.enforce_eager,
            max_num_seqs=settings.capacity,
            max_logprobs=settings.max_logprobs,
            structured_outputs_config=structured_outputs_config(settings),
            runner=settings.runner,
            **extra,
        )
    except UnsupportedModel as exc:
        raise WorkerStartError(str(exc)) from exc


def structured_outputs_config(settings: WorkerSettings) -> dict[str, object]:
    """The engine's structured-output settings: compact JSON (no whitespace the grammar would let a
    model repeat until ``max_tokens``), and the model's reasoning parser, so a grammar starts
    holding the text only once the reasoning ends."""
    config: dict[str, object] = {
        "backend": settings.structured_output_backend,
        "disable_any_whitespace": True,
    }
    if settings.reasoning_parser:
        config["reasoning_parser"] = settings.reasoning_parser
    return config


async def start_sim_engine(settings: WorkerSettings, path: str, served: str | None) -> Engine:
    from worker.sim_engine import SimEngine
    from worker.sim_timing import PRESETS
    from worker.sim_tokens import UnsuitableTokenizer

    try:
        return await SimEngine.start(
            path,
            PRESETS[settings.sim_preset],
            served_name=served,
            max_model_len=settings.max_model_len,
            capacity=settings.capacity,
            speed=settings.sim_speed,
            shaping=sim_shaping(settings),
        )
    except (OSError, UnsuitableTokenizer) as exc:
        raise WorkerStartError(f"the simulated engine cannot use the tokenizer of {path}: {exc}") from exc


async def serve(settings: WorkerSettings) -> None:
    """Run one worker until SIGTERM/SIGINT."""
    redis = Redis.from_url(settings.redis_url, health_check_interval=30)
    metrics_server: MetricsServer | None = None
    try:
        await check_redis(redis, settings.redis_url)
        health = Health(stale_after=max(30.0, settings.heartbeat_interval * 10))
        metrics_server = start_metrics(settings.metrics_port, health)
        engine = await start_engine(settings)
        try:
            await warm_up(engine)
            # vLLM and torch leave a huge, long-lived heap; without this every full collection walks
            # it again and stalls token publishing for a large fraction of a second.
            gc.collect()
            gc.freeze()
            await run_consumer(redis, settings, engine, health)
        finally:
            engine.shutdown()
    finally:
        if metrics_server is not None:
            metrics_server.close()
        await redis.aclose()


async def warm_up(engine: Engine) -> None:
    """Run one short generation (or embedding) before the worker registers: a worker that joins the
    fleet serves its first job at full speed, not after the engine's first-step setup."""
    started = time.monotonic()
    request_id = f"warm-up-{secrets.token_hex(4)}"
    if engine.embedding is not None:
        await engine.embed(request_id, [WARM_UP_PROMPT], None)
    else:
        stream = engine.generate(request_id, WARM_UP_PROMPT, WARM_UP_SAMPLING)
        async with contextlib.aclosing(stream):
            async for _ in stream:
                pass
    log.info("engine warmed up in %.2fs", time.monotonic() - started)


def sim_shaping(settings: WorkerSettings) -> Shaping:
    """The answers the simulated engine gives, from what the worker advertises of its model's."""
    from worker.sim_shapes import Shaping

    parsing = answer_parsing(settings)
    return Shaping(
        reasoning=parsing["reasoning_parser"] is not None,
        reasoning_tokens=settings.sim_reasoning_tokens,
        hermes_tools=parsing["auto_tool_choice"] and parsing["tool_call_parser"] == "hermes",
        tool_calls=settings.sim_tool_calls,
    )


DEMO_TOOL_CALL_PARSER = "hermes"
"""The demo model's chat template writes tool calls as Hermes does: ``<tool_call>{...}</tool_call>``."""


def answer_parsing(settings: WorkerSettings) -> dict[str, Any]:
    """How gateways parse this model's answers (tool calls, reasoning), as its heartbeat says."""
    parser = settings.tool_call_parser
    if parser is None and settings.model == "demo":
        parser = DEMO_TOOL_CALL_PARSER
    auto = settings.enable_auto_tool_choice
    return {
        "tool_call_parser": parser,
        "auto_tool_choice": bool(parser) if auto is None else auto and bool(parser),
        "reasoning_parser": settings.reasoning_parser,
        "max_logprobs": settings.max_logprobs,
    }


def start_metrics(port: int, health: Health) -> MetricsServer | None:
    """Serve /metrics before the engine loads, so a taken port fails fast; 0 means no server."""
    if port == 0:
        return None
    try:
        server = MetricsServer(port, health)
    except OSError as exc:
        raise WorkerStartError(f"cannot serve metrics on port {port}: {exc.strerror}") from exc
    log.info("metrics on http://0.0.0.0:%d/metrics", server.port)
    return server


async def run_consumer(redis: Redis, settings: WorkerSettings, engine: Engine, health: Health) -> None:
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    names = settings.names
    metrics = WorkerMetrics(engine.model_name)
    consumer = Consumer(redis, names, settings, engine, worker_id, metrics)
    now = time.time()
    info = WorkerInfo(
        id=worker_id,
        model=engine.model_name,
        tokenizer=engine.tokenizer_source,
        max_model_len=engine.max_model_len,
        capacity=settings.capacity,
        engine=engine.kind,
        embedding=engine.embedding,
        started_at=now,
        heartbeat_at=now,
        **answer_parsing(settings),
    )

    def status() -> dict[str, object]:
        stats = engine.stats()
        return {
            "inflight": len(consumer.inflight),
            "running": stats.running,
            "waiting": stats.waiting,
            "kv_cache_usage": stats.kv_cache_usage,
            "tokens_per_s": metrics.tokens_per_s(),
            "draining": stopping.is_set(),
        }

    stopping = asyncio.Event()
    heartbeat = Heartbeat(redis, names, info, settings.heartbeat_interval, status, on_beat=health.beat)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    with contextlib.suppress(RedisError, OSError):  # the heartbeat loop says so if Redis is gone
        await heartbeat.beat()  # before "serving": gateways see the worker once its log says so
    outbox = asyncio.create_task(consumer.outbox.run(), name="outbox")
    loops = [
        asyncio.create_task(consumer.read_loop(), name="read"),
        asyncio.create_task(consumer.claims_loop(), name="claims"),
        asyncio.create_task(consumer.cancel_loop(), name="cancel"),
        asyncio.create_task(consumer.handover_loop(), name="handover"),
        asyncio.create_task(heartbeat.run(stopping), name="heartbeat"),
    ]
    log.info(
        "worker %s serving %s (engine %s%s, max_model_len %d, capacity %d)",
        worker_id,
        engine.model_name,
        engine.kind,
        ", embeddings" if engine.embedding is not None else "",
        engine.max_model_len,
        settings.capacity,
    )
    metrics.export()
    health.serving = True
    try:
        await _until_stop_or_crash(stopping, loops)
        health.draining = True
        log.info("stopping: no new jobs")
        consumer.stop()
        await consumer.drain(settings.drain_timeout)
    finally:
        stopping.set()
        consumer.stop()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        outbox.cancel()  # last: draining jobs published their endings through it
        await asyncio.gather(outbox, return_exceptions=True)
        await heartbeat.withdraw()
        metrics.withdraw()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _until_stop_or_crash(stopping: asyncio.Event, loops: list[asyncio.Task[None]]) -> None:
    """Return on a stop signal; re-raise if a background loop dies unexpectedly."""
    stop_wait = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait([stop_wait, *loops], return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    for task in done:
        if task is not stop_wait and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
