"""Fairness benchmark: how much a tenant flooding the system slows another tenant's first token.

Method
------
* Two tenants, each with its own API key and no limits, since this measures queueing, not rate
  limiting: A floods, B is the victim. Both are ``interactive`` unless ``--flooder-priority batch``.
  Every request is ``bench.py``'s: a streaming chat completion generating exactly
  ``--output-tokens`` tokens (``ignore_eos``) after a distinct random-word prompt of about
  ``--prompt-tokens`` tokens, TTFT measured from send to the first content chunk.
* Phase 1, B alone: ``--concurrency`` closed-loop streams for ``--duration`` seconds (no request
  starts after that; those in flight finish and count), after ``--warmup`` unmeasured requests.
* Phase 2, the flood: A starts ``--flood-concurrency`` closed-loop streams (10x B's by default);
  ``--lead`` seconds later, once A's backlog has formed, B repeats phase 1 with new prompts of the
  same shape; A starts no more requests once B's phase is over. A's streams are sent from a
  client process of their own, as from another client of the system (``--one-client``: from B's
  event loop).
* Phase 3, the baseline (skipped with ``--no-shared-queue``): the same flood, and B's requests sent
  with A's key, so they wait in A's stream behind A's backlog: what B would see if every tenant
  shared one first-come first-served queue, measured in the same run.
* With ``--pause``, every stream waits a random moment after each answer before its next request.
  Without it, streams whose requests once met in one engine step (all of one length) end together
  and meet again, for good: B's figures alone then depend on how many of its 4 streams happened to
  lock in step (its TTFT p95 alone read 33, 50 and 68 ms in three runs of the simulated A100).
* Reported: B's TTFT p50/p95/p99 alone, under the flood, and in the shared queue, with their ratios
  to alone; A's TTFT; output tokens/s of B, of A, and of both over B's window (requests that
  finished inside it).

Why the worker runs with a small ``--capacity`` (16 by default, below A's concurrency): a worker
takes at most that many jobs at once (it is also vLLM's ``max_num_seqs``) and leaves the rest in
Redis. Only then is there a queue where B's jobs compete with A's, and the per-tenant streams
decide who goes next: every read takes from each tenant's stream, so B's next job waits for a free
slot rather than behind A's backlog. With capacity above A's concurrency every job would run at
once and the figures would show only how vLLM shares its batch. To show the queue was there, Redis
is read every ``SAMPLE_INTERVAL`` seconds as ``switchyard status`` reads it (XLEN and XPENDING of
each tenant's stream, vLLM's running and waiting sequences from worker heartbeats) and the jobs
waiting in A's stream are reported. What B still pays under the flood is the wait for a free slot
and a busier engine (its prompt shares a batch of 16 instead of about 4, and every step costs
more), which no queueing policy removes short of leaving the engine idle.

By default the system is started the way compare starts it (``runner.switchyard_system``:
``switchyard up`` with an embedded Redis, one gateway, ``--workers`` workers on the demo model,
compare's engine settings) and stopped at the end; ``--base-url`` with ``--key-a`` and ``--key-b``
uses a running one instead (``--redis-url`` adds the queue figures; its workers' capacity is
whatever they were started with).

``--engine sim`` runs the workers on the simulated engine instead (``simfleet.py``: real gateway,
worker and Redis processes; ``--sim-preset``, ``--sim-speed``): it takes the time a GPU would and
next to no CPU, so what is left between B and its first token is queueing and scheduling, not the
flood's client and engine competing with everything for this host's cores. B's streams default to
4 per worker and A's to 10 times B's, so that with more workers the flood still outgrows them all.

    python -m loadtest fairness                              # B 4 streams, A 40, capacity 16, 45 s
    python -m loadtest fairness --engine sim --workers 4     # B 16, A 160, four simulated workers
    python -m loadtest fairness --engine sim --pause 0.1 --worker-setting SWITCHYARD_PREFILL_PER_TENANT=1
    python -m loadtest fairness --flooder-priority batch --out fairness.json
    python -m loadtest fairness --base-url http://127.0.0.1:8000/v1 --key-a sy-... --key-b sy-... \\
        --redis-url redis://127.0.0.1:6379/0

Exit status: 0 when every request succeeded, 1 otherwise, 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from control.processes import free_port
from loadtest import bench, fairreport, proctree, runner, simfleet, tails
from loadtest.benchreport import (
    DEFAULT_TIMEOUT_S,
    BenchConfig,
    RequestResult,
    summarize,
    window_tokens_per_s,
)
from loadtest.report import write_raw
from shared.fleet import gather
from shared.names import Names
from shared.settings import RedisSettings, redact_url
from shared.tenants import Tenant, TenantStore

FLOODER, VICTIM = "flooder", "victim"  # tenant names when this study creates them
SAMPLE_INTERVAL = 0.5


@dataclass(frozen=True)
class Setup:
    """The system under test and the two tenants' keys."""

    base_url: str
    model: str
    key_a: str
    key_b: str
    redis: RedisSettings | None  # where its queues are, if known
    processes: dict[str, int] = field(default_factory=dict)
    """Its processes (name -> pid of a process tree), when started here: their CPU is reported."""
    metrics_url: str | None = None
    """The gateway's ``/metrics`` (on its metrics port), if known: the gateway's own timings."""


class QueueProbe:
    """Reads the two tenants' streams and the model's workers from Redis, as ``switchyard status`` does."""

    def __init__(self, redis: Redis, names: Names, model: str, flooder: str, victim: str) -> None:
        self.redis, self.names, self.model = redis, names, model
        self.flooder, self.victim = flooder, victim

    @classmethod
    async def connect(cls, settings: RedisSettings, model: str, key_a: str, key_b: str) -> QueueProbe:
        """Find the keys' tenants, hence their streams."""
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3)
        store = TenantStore(redis, settings.names)
        tenants = [await store.authenticate(key) for key in (key_a, key_b)]
        if tenants[0] is None or tenants[1] is None:
            await redis.aclose()
            raise RuntimeError(
                f"--key-a/--key-b are not keys of tenants in {redact_url(settings.redis_url)} "
                f"under prefix {settings.key_prefix!r}"
            )
        return cls(redis, settings.names, model, tenants[0].name, tenants[1].name)

    async def snapshot(self, t: float) -> tuple[fairreport.QueueSample, int]:
        """One sample at phase time ``t``, and the live workers' total capacity."""
        snap = await gather(self.redis, self.names)
        streams = {s.tenant: s for s in snap.streams if s.model == self.model}
        workers = [w for w in snap.workers if w.model == self.model and w.live]
        a, b = streams.get(self.flooder), streams.get(self.victim)
        sample = fairreport.QueueSample(
            t=t,
            flooder_backlog=a.backlog if a else 0,
            flooder_running=a.pending if a else 0,
            victim_backlog=b.backlog if b else 0,
            victim_running=b.pending if b else 0,
            engine_running=sum(w.running for w in workers),
            engine_waiting=sum(w.waiting for w in workers),
        )
        return sample, sum(w.capacity for w in workers)

    async def watch(self, out: list[fairreport.QueueSample], t0: float, stop: asyncio.Event) -> None:
        """Sample until ``stop`` is set; a failed read is skipped, not fatal to the run."""
        while not stop.is_set():
            with contextlib.suppress(RedisError, OSError):
                sample, _ = await self.snapshot(time.perf_counter() - t0)
                out.append(sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)

    async def capacity(self) -> int | None:
        with contextlib.suppress(RedisError, OSError):
            _, total = await self.snapshot(0.0)
            return total or None
        return None


@contextlib.asynccontextmanager
async def watching(
    probe: QueueProbe | None, out: list[fairreport.QueueSample], t0: float
) -> AsyncIterator[None]:
    """Sample the queues in the background for the duration of the block."""
    if probe is None:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(probe.watch(out, t0, stop))
    try:
        yield
    finally:
        stop.set()
        await task


QUEUE_METRIC = "switchyard:request_queue_time_seconds"
TTFT_METRIC = "switchyard:time_to_first_token_seconds"
LAG_METRIC = "switchyard:gateway_event_loop_lag_seconds"
KINDS = ("queue", "ttft", "lag")


async def gateway_totals(
    client: httpx.AsyncClient, url: str | None, tenant: str
) -> dict[str, tails.Histogram] | None:
    """The gateway's queue-time and TTFT histograms for ``tenant`` (every model) and its event-loop
    lag, by kind, from its ``/metrics`` at ``url``; None when that is unknown or answers nothing
    (e.g. not a Switchyard gateway)."""
    if url is None:
        return None
    try:
        resp = await client.get(url)
        resp.raise_for_status()
    except httpx.HTTPError:
        return None
    tenants, every = tails.parse(resp.text, tenant=tenant), tails.parse(resp.text)
    return {
        "queue": tenants.get(QUEUE_METRIC, tails.Histogram()),
        "ttft": tenants.get(TTFT_METRIC, tails.Histogram()),
        "lag": every.get(LAG_METRIC, tails.Histogram()),
    }


def gateway_split(
    before: dict[str, tails.Histogram] | None, after: dict[str, tails.Histogram] | None
) -> dict[str, float | None]:
    """Mean wait for a worker to start the job and mean TTFT, both as the gateway saw them (ms),
    over the requests between two :func:`gateway_totals` readings, and the bucket bound under which
    99% of those waits and TTFTs fell (a histogram's p99 is only known to its bucket); the same of
    how late the gateway's event loop ran meanwhile."""
    if before is None or after is None:
        return {f"{kind}_{stat}": None for kind in KINDS for stat in ("mean_ms", "p99_le_ms")}
    runs = {kind: after[kind].minus(before[kind]) for kind in KINDS}
    p99 = {kind: run.bound_or_none(0.99) if run.count > 0 else None for kind, run in runs.items()}
    return {
        **{f"{k}_mean_ms": 1000 * run.mean if run.count > 0 else None for k, run in runs.items()},
        **{f"{k}_p99_le_ms": None if le is None else 1000 * le for k, le in p99.items()},
    }


def until(deadline: float) -> Callable[[], bool]:
    return lambda: time.perf_counter() >= deadline


@dataclass(frozen=True)
class Loads:
    """What both phases send: each tenant's request shape and client, the calibrated prompt length."""

    a: BenchConfig
    b: BenchConfig
    client_a: httpx.AsyncClient
    client_b: httpx.AsyncClient
    words: int
    ramp: float = 0.0
    """Seconds over which each tenant's streams start (A's within the lead)."""
    pause: float = 0.0
    """Longest random pause of a stream between an answer and its next request."""
    flood_process: bool = True
    """A's flood runs in a client process of its own (else on B's event loop)."""
    uvloop: bool = True


@dataclass(frozen=True)
class Phase:
    """One tenant's requests in one phase, and the CPU time of the client that sent them (on one
    event loop, both tenants')."""

    results: list[RequestResult]
    wall: float
    cpu: float


FLOOD_CHILD = "--flood-child"
"""First argument of this study run as A's client (see :class:`FloodProcess`)."""

Finish = Callable[[], Awaitable[tuple[list[RequestResult], float, float | None]]]
"""Ends a flood: A starts no more requests; its results, wall time and client CPU seconds (None
when its client is B's too) once those in flight have ended."""


class FloodProcess:
    """A's flood sent from a process of its own, as another client of the system would send it,
    rather than from B's event loop (which made no difference to B's figures at four simulated
    workers: ``loadtest/results/2026-12-03-fairness-client/``). Results come back as JSON;
    ``sent`` times are ``time.perf_counter()``, the system-wide monotonic clock on Linux, so they
    compare with this process's."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, loads: Loads, ramp: float) -> FloodProcess:
        """Start it and return once its client is ready to send."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest", "fairness", FLOOD_CHILD, cwd=runner.REPO_ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        spec = {"cfg": asdict(loads.a), "words": loads.words, "ramp": ramp, "pause": loads.pause}
        try:
            proc.stdin.write(json.dumps(spec | {"uvloop": loads.uvloop}).encode() + b"\n")
            await proc.stdin.drain()
            ready = await proc.stdout.readline()
        except OSError:  # it exited before reading its orders
            ready = b""
        if ready.strip() != b"ready":
            if proc.returncode is None:
                proc.kill()
            raise RuntimeError(f"A's client process did not start (exit status {await proc.wait()})")
        return cls(proc)

    async def finish(self) -> tuple[list[RequestResult], float, float | None]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.close()  # its signal to start no more requests
            out = await self.proc.stdout.read()
            if await self.proc.wait() != 0:
                raise RuntimeError(f"A's client process failed with exit status {self.proc.returncode}")
        finally:  # cancelled, e.g. by a timeout: it must not outlive the run
            if self.proc.returncode is None:
                self.proc.kill()
        try:
            data = json.loads(out)
            return [RequestResult(**r) for r in data["results"]], data["wall"], data["cpu"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"A's client process sent no readable results: {exc!r}") from exc


def flood_child() -> int:
    """Run as A's client (:class:`FloodProcess`): the flood described on stdin's first line until
    stdin ends, then every result as JSON on stdout, with all the CPU time this process used
    (its start included: it is all the flood's client)."""
    spec = json.loads(sys.stdin.readline())
    cfg = BenchConfig(**spec["cfg"])

    async def run() -> tuple[list[RequestResult], float]:
        loop = asyncio.get_running_loop()
        over = asyncio.Event()

        def wait_for_eof() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(over.set)

        async with bench.make_client(cfg) as client:
            print("ready", flush=True)
            threading.Thread(target=wait_for_eof, daemon=True).start()
            return await bench.run_closed_loop(
                client, cfg, spec["words"], None, cfg.concurrency, "flood", over.is_set,
                spec["ramp"], spec["pause"],
            )  # fmt: skip

    results, wall = bench.run_on_loop(run(), spec["uvloop"])
    rows = [asdict(r) for r in results]
    json.dump({"results": rows, "wall": wall, "cpu": time.process_time()}, sys.stdout)
    return 0


async def start_flood(loads: Loads, ramp: float) -> Finish:
    """Start A's closed-loop flood, in its own process or on this event loop."""
    if loads.flood_process:
        flood = await FloodProcess.start(loads, ramp)
        return flood.finish
    over = asyncio.Event()
    a = loads.a
    task = asyncio.create_task(
        bench.run_closed_loop(
            loads.client_a, a, loads.words, None, a.concurrency, "flood", over.is_set, ramp, loads.pause
        )
    )

    async def finish() -> tuple[list[RequestResult], float, float | None]:
        over.set()
        results, wall = await task
        return results, wall, None

    return finish


async def phase_alone(loads: Loads, duration: float) -> Phase:
    cpu0, t0 = time.process_time(), time.perf_counter()
    results, wall = await bench.run_closed_loop(
        loads.client_b, loads.b, loads.words, None, loads.b.concurrency, "alone", until(t0 + duration),
        ramp=loads.ramp, pause=loads.pause,
    )  # fmt: skip
    return Phase(results, wall, time.process_time() - cpu0)


async def phase_flood(
    loads: Loads, duration: float, lead: float, victim: tuple[httpx.AsyncClient, BenchConfig] | None = None
) -> tuple[Phase, Phase, float, float]:
    """A floods; ``lead`` seconds later B runs as when alone (with ``victim``'s client and config
    instead of B's own, e.g. A's key). Returns B's and A's requests and when B's measured window
    started and ended (``time.perf_counter()``)."""
    client_b, cfg_b = victim or (loads.client_b, loads.b)
    cpu0 = time.process_time()
    finish = await start_flood(loads, min(loads.ramp, lead))
    finished = False
    try:
        await asyncio.sleep(lead)  # A's backlog forms before B is measured
        start = time.perf_counter()
        measured, measured_wall = await bench.run_closed_loop(
            client_b, cfg_b, loads.words, None, cfg_b.concurrency, "victim", until(start + duration),
            ramp=loads.ramp, pause=loads.pause,
        )  # fmt: skip
        end = time.perf_counter()
        flooder, flooder_wall, flooder_cpu = await finish()
        finished = True
    finally:
        if not finished:  # B failed or was interrupted: A's client must not outlive the run
            with contextlib.suppress(Exception):
                async with asyncio.timeout(60):
                    await finish()
    cpu = time.process_time() - cpu0
    return (
        Phase(measured, measured_wall, cpu),
        Phase(flooder, flooder_wall, cpu if flooder_cpu is None else flooder_cpu),
        start,
        end,
    )


async def run_phases(args: argparse.Namespace, setup: Setup) -> fairreport.FairnessReport:
    """Calibrate and warm up with B's key, run B alone, then B under A's flood, sampling the queues."""
    cfg_b = BenchConfig(
        base_url=setup.base_url, model=setup.model, concurrency=args.concurrency,
        requests=0,  # both phases run for a time, not a count
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, warmup=args.warmup,
        api_key=setup.key_b, seed=args.seed, timeout_s=args.timeout,
    )  # fmt: skip
    cfg_a = replace(cfg_b, concurrency=args.flood_concurrency, warmup=0, api_key=setup.key_a)
    probe = None
    if setup.redis is not None:
        probe = await QueueProbe.connect(setup.redis, setup.model, setup.key_a, setup.key_b)
    samples_alone: list[fairreport.QueueSample] = []
    samples_flood: list[fairreport.QueueSample] = []
    try:
        async with bench.make_client(cfg_a) as client_a, bench.make_client(cfg_b) as client_b:
            words, warm_errors = await bench.warm_up(client_b, cfg_b)
            loads = Loads(
                cfg_a, cfg_b, client_a, client_b, words, args.ramp, args.pause,
                flood_process=not args.one_client, uvloop=not args.no_uvloop,
            )  # fmt: skip
            capacity = await probe.capacity() if probe else None
            victim_name = probe.victim if probe else VICTIM

            async def totals() -> dict[str, tails.Histogram] | None:
                return await gateway_totals(client_b, setup.metrics_url, victim_name)

            print(f"phase 1: B alone, {cfg_b.concurrency} streams, {args.duration:.0f} s", flush=True)
            before, cpu = await totals(), proctree.cpu_seconds(setup.processes)
            async with watching(probe, samples_alone, time.perf_counter()):
                alone = await phase_alone(loads, args.duration)
            cpu_alone = proctree.cores(cpu, proctree.cpu_seconds(setup.processes), alone.wall)
            split_alone = gateway_split(before, await totals())
            print(f"phase 2: A floods with {cfg_a.concurrency} streams, B as in phase 1", flush=True)
            t0 = time.perf_counter()
            before, cpu = await totals(), proctree.cpu_seconds(setup.processes)
            async with watching(probe, samples_flood, t0):
                victim, flooder, start, end = await phase_flood(loads, args.duration, args.lead)
            wall = time.perf_counter() - t0
            cpu_flood = proctree.cores(cpu, proctree.cpu_seconds(setup.processes), wall)
            if loads.flood_process:  # A's client: a process outside those read above
                cpu_flood["flood client"] = flooder.cpu / wall
                cpu_flood["other"] = max(0.0, cpu_flood["other"] - cpu_flood["flood client"])
            split_flood = gateway_split(before, await totals())
            shared = None
            if not args.no_shared_queue:
                print("phase 3: A floods again, B's requests go to A's queue (first come, first served)")
                cfg_shared = replace(cfg_b, api_key=setup.key_a)
                async with bench.make_client(cfg_shared) as client_shared:
                    shared, _, _, _ = await phase_flood(
                        loads, args.duration, args.lead, victim=(client_shared, cfg_shared)
                    )
    finally:
        if probe is not None:
            await probe.redis.aclose()

    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if "key" not in k}
    return fairreport.FairnessReport(
        options=options | {"base_url": setup.base_url, "model": setup.model, "prompt_words": words},
        alone=summarize(cfg_b, words, alone.results, alone.wall, alone.cpu, warm_errors),
        victim=summarize(cfg_b, words, victim.results, victim.wall, victim.cpu, 0),
        flooder=summarize(cfg_a, words, flooder.results, flooder.wall, flooder.cpu, 0),
        shared_queue=None
        if shared is None
        else summarize(cfg_b, words, shared.results, shared.wall, shared.cpu, 0),
        flood_tokens_per_s=window_tokens_per_s([*flooder.results, *victim.results], start, end),
        queue_alone=fairreport.queue_summary(samples_alone, 0.0, alone.wall),
        queue_flood=fairreport.queue_summary(samples_flood, start - t0, end - t0),
        worker_capacity=capacity,
        gateway_alone=split_alone,
        gateway_flood=split_flood,
        cpu_alone=cpu_alone,
        cpu_flood=cpu_flood,
    )


def run_started_system(args: argparse.Namespace) -> fairreport.FairnessReport:
    """Start ``switchyard up`` with a small capacity, run both phases, always stop it."""
    model_dir, args.model_name = runner.resolve_model(args.model_dir, args.model_name)
    log = args.log or Path(tempfile.mkdtemp(prefix="switchyard-fairness-")) / "system.log"
    metrics_port = free_port()  # where up's gateway serves /metrics (its workers: the ports after it)
    with runner.switchyard_system(
        model_dir, args.model_name, args.capacity, args.workers, log, args.ready_timeout,
        env={"SWITCHYARD_METRICS_PORT": str(metrics_port)},
    ) as system:  # fmt: skip
        redis = RedisSettings(redis_url=system.redis_url)  # the prefix as the system reads it: env
        key_a, key_b = runner.add_tenants(
            redis, Tenant(name=FLOODER, priority=args.flooder_priority), Tenant(name=VICTIM)
        )
        base_url, pid = system.target.base_url, system.proc.pid
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        setup = Setup(base_url, args.model_name, key_a, key_b, redis, {"system": pid}, metrics)
        return bench.run_on_loop(run_phases(args, setup), not args.no_uvloop)


def run_simulated_system(args: argparse.Namespace) -> fairreport.FairnessReport:
    """Start a simulated fleet (Redis, a gateway, ``--workers`` workers), run the phases, stop it."""
    tokenizer = {} if args.model_dir is None else {"model": str(args.model_dir.resolve())}
    name = args.model_name or (args.model_dir.name if args.model_dir else None)
    spec = simfleet.FleetSpec(
        workers=args.workers, capacity=args.capacity, preset=args.sim_preset, speed=args.sim_speed,
        worker_env=dict(setting.split("=", 1) for setting in args.worker_setting),
        gateway_env=dict(setting.split("=", 1) for setting in args.gateway_setting),
        **tokenizer, **({"served_name": name} if name else {}),
    )  # fmt: skip
    logs = args.log.parent if args.log else Path(tempfile.mkdtemp(prefix="switchyard-fairness-"))
    print(f"starting {args.workers} simulated worker(s) ({args.sim_preset} at {args.sim_speed}x, "
          f"capacity {args.capacity}), a gateway and Redis (logs: {logs})", flush=True)  # fmt: skip
    with simfleet.SimFleet(spec, logs) as fleet:
        key_a = fleet.add_tenant(FLOODER, args.flooder_priority)
        key_b = fleet.add_tenant(VICTIM)
        redis = fleet.settings
        setup = Setup(
            f"{fleet.base_url}/v1", spec.served_name, key_a, key_b, redis, fleet.processes(),
            fleet.gateway_metrics_url,
        )  # fmt: skip
        return bench.run_on_loop(run_phases(args, setup), not args.no_uvloop)


def run_given_system(args: argparse.Namespace) -> fairreport.FairnessReport:
    model = args.model_name or runner.first_model(args.base_url, args.key_b)
    redis = None
    if args.redis_url:
        prefix = {"key_prefix": args.key_prefix} if args.key_prefix else {}
        redis = RedisSettings(redis_url=args.redis_url, **prefix)
    setup = Setup(args.base_url, model, args.key_a, args.key_b, redis, metrics_url=args.metrics_url)
    return bench.run_on_loop(run_phases(args, setup), not args.no_uvloop)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest fairness", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--base-url", help="a running system, e.g. http://127.0.0.1:8000/v1 (default: start one)")
    add("--key-a", help="with --base-url: the flooding tenant's key")
    add("--key-b", help="with --base-url: the victim tenant's key")
    add("--redis-url", help="with --base-url: its Redis, for the queue figures")
    add("--key-prefix", help="with --redis-url: its prefix (default: switchyard)")
    add("--metrics-url", help="with --base-url: its gateway's /metrics (on the gateway's metrics port), "
        "for the gateway's own queue-time and TTFT figures")  # fmt: skip
    add("--model-dir", type=Path, help="default: the demo model (built if missing)")
    add("--model-name", help="served model name (default: the demo's, the directory's, or the first listed)")
    add("--capacity", type=int, default=16, help="jobs each started worker runs at once (default: 16)")
    add("--workers", type=int, default=1, help="workers to start (default: 1)")
    add("--engine", choices=["vllm", "sim"], default="vllm",
        help="what the started workers run: vLLM on the model, or the simulated engine")  # fmt: skip
    add("--sim-preset", choices=["l4", "a100", "h100", "cpu-demo"], default="a100",
        help="with --engine sim: its timing (default: a100)")  # fmt: skip
    add("--sim-speed", type=float, default=1.0, help="with --engine sim: its speed-up (default: 1)")
    add("--worker-setting", action="append", default=[], metavar="NAME=VALUE",
        help="with --engine sim: a SWITCHYARD_* setting for every worker, e.g. "
        "SWITCHYARD_PREFILL_PER_TENANT=1 (repeatable)")  # fmt: skip
    add("--gateway-setting", action="append", default=[], metavar="NAME=VALUE",
        help="with --engine sim: a SWITCHYARD_* setting for the gateway, e.g. "
        "SWITCHYARD_PROCESSES=2 (repeatable)")  # fmt: skip
    add("--flooder-priority", choices=["interactive", "batch"], default="interactive",
        help="A's priority class when this study creates the tenants; B is interactive")  # fmt: skip
    add("--concurrency", type=int, help="B's streams (default: 4 per worker)")
    add("--flood-concurrency", type=int, help="A's streams (default: 10x B's)")
    add("--duration", type=float, default=45.0, help="seconds B is measured in each phase (default: 45)")
    add("--lead", type=float, default=5.0, help="seconds A floods before B's phase 2 (default: 5)")
    add("--ramp", type=float, default=0.0,
        help="seconds over which each tenant's streams start, A's within the lead (default: 0)")  # fmt: skip
    add("--pause", type=float, default=0.0,
        help="each stream waits a random 0 to this many seconds after each answer, as a user "
             "reading it; keeps streams of one shape from staying in step (default: 0)")  # fmt: skip
    add("--prompt-tokens", type=int, default=64)
    add("--output-tokens", type=int, default=64)
    add("--no-shared-queue", action="store_true",
        help="skip phase 3, B's requests sent with A's key into A's queue: what B would see if "
             "tenants shared one first-come first-served queue")  # fmt: skip
    add("--one-client", action="store_true",
        help="send A's flood from this process's event loop, beside B's streams, instead of from "
             "a client process of its own")  # fmt: skip
    add("--warmup", type=int, default=8, help="B's unmeasured requests before phase 1 (default: 8)")
    add("--seed", type=int, default=0)
    add("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per-request read timeout (s)")
    add("--ready-timeout", type=float, default=300.0, help="seconds to wait for the started system")
    add("--log", type=Path, help="the started system's output (default: in a temporary directory)")
    add("--out", type=Path,
        help="write every figure, each request's too, gzip-compressed, as NAME.gz")  # fmt: skip
    add("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = 4 * args.workers
    if args.flood_concurrency is None:
        args.flood_concurrency = 10 * args.concurrency
    sizes = (args.concurrency, args.flood_concurrency, args.capacity, args.prompt_tokens, args.output_tokens)
    if min(*sizes, args.workers) < 1 or args.sim_speed <= 0:
        p.error("concurrency, flood concurrency, capacity, workers, prompt and output tokens must be >= 1")
    settings = {"--worker-setting": args.worker_setting, "--gateway-setting": args.gateway_setting}
    for flag, given in settings.items():
        if any("=" not in setting for setting in given):
            p.error(f"{flag} takes NAME=VALUE")
    if (args.worker_setting or args.gateway_setting) and args.engine != "sim":
        p.error("--worker-setting and --gateway-setting apply to a simulated fleet (--engine sim); "
                "otherwise set the SWITCHYARD_* variable in the environment")  # fmt: skip
    if args.duration <= 0 or args.lead < 0 or args.warmup < 0:
        p.error("--duration must be > 0, --lead and --warmup >= 0")
    if args.base_url is not None and not (args.key_a and args.key_b):
        p.error("--base-url needs --key-a and --key-b")
    if args.base_url is None and (
        args.key_a or args.key_b or args.redis_url or args.key_prefix or args.metrics_url
    ):
        p.error("--key-a, --key-b, --redis-url, --key-prefix and --metrics-url go with --base-url")
    return args


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == [FLOOD_CHILD]:
        return flood_child()
    args = parse_args(argv)
    try:
        if args.base_url:
            rep = run_given_system(args)
        elif args.engine == "sim":
            rep = run_simulated_system(args)
        else:
            rep = run_started_system(args)
    except (runner.ServerError, RuntimeError, httpx.HTTPError, RedisError, OSError) as exc:
        print(f"fairness: cannot run: {exc}", file=sys.stderr)
        return 2
    print()
    print(fairreport.render_text(rep))
    if args.out is not None:
        print(f"wrote {write_raw(args.out, fairreport.to_json(rep))}")
    return 1 if sum(r.errors for r in rep.runs) + rep.alone.warmup_errors else 0
