"""Scaling out: output tokens/s and balance of 1, 2, 4, 8, 16 simulated workers behind one gateway.

Method
------
* For each fleet size N (``--workers``, 1 first: it is the baseline), start a fresh fleet
  (``simfleet.py``: an embedded Redis, one gateway, N workers running the simulated engine with
  ``--preset``, ``--speed`` and ``--capacity``), each a real process on free ports, and stop it
  afterwards. The simulated engine takes the time the preset's GPU would and costs little CPU, so
  what competes for this host's CPUs is the serving path: gateway, Redis, the workers' own loops
  and the client.
* Burst: ``--burst-per-worker`` x N streaming requests sent at once to the idle fleet, the
  tenant's first ever (its stream is new to every worker); the jobs each worker took are counted.
* Steady load: ``--streams-per-worker`` x N closed-loop streaming requests (``bench.py``'s:
  ``--prompt-tokens`` prompts, exactly ``--output-tokens`` output tokens), shared round-robin by
  ``--tenants`` tenants, started spread over the first half of ``--warmup`` seconds (streams
  started together would finish together, in waves); then a window of ``--duration`` seconds. The load
  grows with N, so each worker is as busy as the one worker of the baseline, below its capacity:
  where the jobs go is then the workers' reading, not their capacity.
* In the window: output tokens/s the workers generated (their ``switchyard:worker_generation_tokens``
  counters) and the clients received, the jobs each worker completed
  (``switchyard:worker_jobs_total{outcome="completed"}``), TTFT of the requests sent in it, and the
  CPU each process used (``/proc``), the client's (this process) and the whole host's, so that work
  from elsewhere shows.
* Reported: a table per N, whether N workers give >= 0.9 N times one worker's tokens/s and jobs per
  worker within ±15% of the mean, and where the path saturated (the gateway, Redis or the client
  near a whole core, or the host's CPUs all busy). Writes ``scale.json``, ``scale.png`` and
  ``summary.md`` to ``--out`` (``loadtest/results/<date>-scale/`` by default) with every process's log
  (gzip-compressed, ``logs/<N>-workers/*.log.gz``).

Defaults: the ``l4`` preset at 2x, capacity 64, 32 streams per worker, 128 output tokens. One such
worker generates about 750 tokens/s, and gateway, Redis, worker and client together spend about
0.2 cores on it (2-core host, one token per reply message at this step time): 1 to 4 workers leave
the host room, so they measure the workers' scaling, and 8 to 16 reach the host's limit, so the
report shows where the path saturates and which process gives out first.

    python -m loadtest scale                                  # 1, 2, 4, 8, 16 workers
    python -m loadtest scale --workers 1,2 --duration 10 --warmup 5 --out /tmp/scale

Exit status: 0 when every request succeeded, 1 otherwise, 2 when a fleet could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx

from loadtest import bench, proctree, runner, scalereport, simfleet
from loadtest.benchreport import DEFAULT_TIMEOUT_S, BenchConfig, RequestResult, window_tokens_per_s
from loadtest.report import percentile, results_dir

BURST_TOKENS = 16
BURST_WORDS = 24


@dataclass(frozen=True)
class Snapshot:
    """Counters read at one instant: per worker, jobs completed and tokens generated; CPU seconds."""

    at: float
    jobs: list[float]
    tokens: list[float]
    cpu: dict[str, float]


async def worker_counters(
    http: httpx.AsyncClient, fleet: simfleet.SimFleet
) -> tuple[list[float], list[float]]:
    """Jobs completed and tokens generated so far, per worker."""
    texts = await asyncio.gather(*(http.get(w.metrics_url or "") for w in fleet.workers))
    jobs = [runner.counter(t.text, "switchyard:worker_jobs", outcome="completed") for t in texts]
    tokens = [runner.counter(t.text, "switchyard:worker_generation_tokens") for t in texts]
    return jobs, tokens


async def snapshot(http: httpx.AsyncClient, fleet: simfleet.SimFleet) -> Snapshot:
    jobs, tokens = await worker_counters(http, fleet)
    return Snapshot(time.perf_counter(), jobs, tokens, proctree.cpu_seconds(fleet.processes()))


async def burst(
    args: argparse.Namespace, fleet: simfleet.SimFleet, clients: list[tuple[httpx.AsyncClient, BenchConfig]]
) -> list[int]:
    """Send the burst at once to the idle fleet; the jobs each worker took."""
    n = args.burst_per_worker * len(fleet.workers)
    async with httpx.AsyncClient(trust_env=False) as http:
        before, _ = await worker_counters(http, fleet)
        sends = []
        for i in range(n):  # the tenants in turn
            client, cfg = clients[i % len(clients)]
            prompt = bench.make_prompt(args.seed, f"burst{i}", BURST_WORDS)
            sends.append(bench.one_request(client, cfg, prompt, BURST_TOKENS))
        results = await asyncio.gather(*sends)
        # A worker counts a job once its last reply is out, so the client may finish first.
        deadline = time.monotonic() + 5
        while True:
            after, _ = await worker_counters(http, fleet)
            if sum(after) - sum(before) >= sum(r.ok for r in results) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    failed = [r.error for r in results if not r.ok]
    if failed:
        print(f"  burst: {len(failed)} of {n} requests failed, e.g. {failed[0]}", flush=True)
    return [round(b - a) for a, b in zip(before, after, strict=True)]


async def measure(args: argparse.Namespace, fleet: simfleet.SimFleet, keys: list[str]) -> scalereport.Level:
    """The burst, then the steady load and its window, on a started fleet."""
    n = len(fleet.workers)
    streams = args.streams_per_worker * n
    shape = BenchConfig(
        base_url=f"{fleet.base_url}/v1", model=fleet.spec.served_name, requests=0, warmup=0,
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, timeout_s=DEFAULT_TIMEOUT_S,
    )  # fmt: skip
    # One client per tenant, its connection pool sized for all its streams and the burst at once.
    pool = max(streams, args.burst_per_worker * n) // len(keys) + 1
    configs = [replace(shape, concurrency=pool, api_key=k, seed=args.seed + i) for i, k in enumerate(keys)]
    async with contextlib.AsyncExitStack() as stack:
        clients = [(await stack.enter_async_context(bench.make_client(c)), c) for c in configs]
        http = await stack.enter_async_context(httpx.AsyncClient(trust_env=False, timeout=10))
        burst_jobs = await burst(args, fleet, clients)
        print(f"  burst of {args.burst_per_worker * n}: jobs per worker {burst_jobs}", flush=True)
        words = await bench.calibrate_words(*clients[0])
        stop = asyncio.Event()
        split = [streams // len(clients) + (i < streams % len(clients)) for i in range(len(clients))]
        loops = [
            # Started over half the warm-up: streams started together would finish together, in
            # waves, and every worker would prefill its whole batch in one step.
            asyncio.create_task(
                bench.run_closed_loop(
                    client, cfg, words, None, c, f"t{i}-", stop.is_set, ramp=args.warmup / 2
                )
            )
            for i, ((client, cfg), c) in enumerate(zip(clients, split, strict=True))
            if c
        ]
        try:
            await asyncio.sleep(args.warmup)
            before = await snapshot(http, fleet)
            await asyncio.sleep(args.duration)
            after = await snapshot(http, fleet)
        finally:
            stop.set()
            done = await asyncio.gather(*loops)
    results: list[RequestResult] = [r for rs, _ in done for r in rs]
    inside = [r for r in results if before.at <= r.sent <= after.at]
    ttft = scalereport.ttfts_ms(results, before.at, after.at)
    window = after.at - before.at
    errors = [r for r in inside if not r.ok]
    return scalereport.Level(
        workers=n,
        streams=streams,
        window_s=window,
        tokens_per_s=(sum(after.tokens) - sum(before.tokens)) / window,
        client_tokens_per_s=window_tokens_per_s(results, before.at, after.at),
        requests_ok=len(inside) - len(errors),
        errors=len(errors),
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p95_ms=percentile(ttft, 95),
        jobs=[round(b - a) for a, b in zip(before.jobs, after.jobs, strict=True)],
        burst=args.burst_per_worker * n,
        burst_jobs=burst_jobs,
        cores=proctree.cores(before.cpu, after.cpu, window),
        error_samples={e.error or "?": 1 for e in errors[:5]},
    )


def run_level(args: argparse.Namespace, n: int) -> scalereport.Level:
    """Start a fleet of ``n`` workers, measure it, stop it."""
    spec = simfleet.FleetSpec(workers=n, capacity=args.capacity, preset=args.preset, speed=args.speed)
    with simfleet.SimFleet(spec, args.out / "logs" / f"{n}-workers") as fleet:
        keys = [fleet.add_tenant(f"scale-{i}") for i in range(args.tenants)]
        return bench.run_on_loop(measure(args, fleet, keys))


def parse_workers(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("workers: comma-separated integers >= 1")
    return sorted(set(counts))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest scale", description=__doc__.splitlines()[0] if __doc__ else None
    )
    add = p.add_argument
    add("--workers", type=parse_workers, default=[1, 2, 4, 8, 16], help="fleet sizes (default: 1,2,4,8,16)")
    add("--preset", default="l4", choices=["l4", "a100", "h100", "cpu-demo"],
        help="the simulated engine's timing (default: l4)")  # fmt: skip
    add("--speed", type=float, default=2.0, help="the simulated engine's speed-up (default: 2)")
    add("--capacity", type=int, default=64, help="jobs one worker runs at once (default: 64)")
    add("--streams-per-worker", type=int, default=32, help="closed-loop streams per worker (default: 32)")
    add("--tenants", type=int, default=1, help="tenants sharing the streams (default: 1)")
    add("--prompt-tokens", type=int, default=64)
    add("--output-tokens", type=int, default=128)
    add("--burst-per-worker", type=int, default=12, help="requests per worker of the burst (default: 12)")
    add("--warmup", type=float, default=15.0, help="seconds of load before the window (default: 15)")
    add("--duration", type=float, default=40.0, help="seconds measured per fleet size (default: 40)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=results_dir("scale"))
    args = p.parse_args(argv)
    if min(args.capacity, args.streams_per_worker, args.tenants, args.prompt_tokens, args.output_tokens) < 1:
        p.error("capacity, streams per worker, tenants, prompt and output tokens must be >= 1")
    if args.duration <= 0 or args.warmup < 0 or args.burst_per_worker < 0 or args.speed <= 0:
        p.error("--duration and --speed must be > 0, --warmup and --burst-per-worker >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = parse_args(given)
    args.out.mkdir(parents=True, exist_ok=True)
    from worker.demo_model import ensure_demo_model

    ensure_demo_model()  # once here, not in every worker at once
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "loadtest", "scale", *given]),
        "host_cpus": os.cpu_count(),
    } | {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = scalereport.ScaleReport(meta, [])
    try:
        for n in args.workers:
            print(f"=== {n} worker(s), {n * args.streams_per_worker} streams", flush=True)
            level = run_level(args, n)
            report.levels.append(level)
            print(f"  {level.tokens_per_s:.0f} tokens/s, jobs per worker {level.jobs}, "
                  f"cores {({k: round(v, 2) for k, v in level.cores.items()})}", flush=True)  # fmt: skip
    except simfleet.FleetError as exc:
        print(f"scale: cannot run: {exc}", file=sys.stderr)
        return 2
    finally:
        if report.levels:
            (args.out / "scale.json").write_text(scalereport.to_json(report))
            scalereport.write_chart(report, args.out / "scale.png")
            (args.out / "summary.md").write_text(scalereport.render_summary(report))
    print()
    print(scalereport.render_text_report(report))
    print(f"\nwrote {args.out / 'summary.md'}, scale.json and scale.png")
    return 1 if any(lv.errors for lv in report.levels) else 0
