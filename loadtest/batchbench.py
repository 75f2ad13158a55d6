"""Batch benchmark: a Batch API batch running beside interactive traffic, and what it costs that traffic.

Method
------
* One interactive tenant sends ``--concurrency`` closed-loop streaming chat completions, ``bench.py``'s
  requests: a distinct random-word prompt of about ``--prompt-tokens`` tokens, exactly
  ``--output-tokens`` tokens out (``ignore_eos``), TTFT measured from send to the first content chunk.
* Phase 1, interactive alone, for ``--duration`` seconds (after ``--warmup`` unmeasured requests).
* Phase 2, the same traffic while another tenant's batch of ``--lines`` lines runs: the file is
  uploaded and the batch created through the API (as the SDK does), each line a chat completion of
  about ``--batch-prompt-tokens`` tokens asking for exactly ``--batch-output-tokens``. Interactive
  requests run from the batch's creation until it ends; those sent while it was ``in_progress``
  are the ones measured.
* Phase 3 (``--alone-lines N``): a batch of N lines with no interactive traffic, for comparison.
* Reported: interactive TTFT p50/p95/p99 alone and beside the batch (with ratios), interactive
  output tokens/s in both phases, the batch's lines/s (lines over the time it was in progress, as
  polled every ``POLL`` s) and its time from creation to completion, its request counts, and this
  process's CPU (the load generator competes with the system on a small host).

By default the system is started the way fairness starts it (``runner.switchyard_system``:
``switchyard up`` with compare's engine settings, an embedded Redis, one gateway, one worker on the
demo model, and its jobs process; ``--extra-jobs`` adds another ``switchyard jobs``), and stopped at the end;
``--base-url`` with ``--key`` and ``--batch-key`` measures a running system with its jobs processes.

    python -m loadtest batchbench                                   # 1,000 lines, 4 streams, 45 s alone
    python -m loadtest batchbench --lines 100 --duration 15 --out batch.json
    python -m loadtest batchbench --base-url http://127.0.0.1:8000/v1 --key sy-... --batch-key sy-...

Exit status: 0 when every request and line succeeded, 1 otherwise, 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from loadtest import bench, runner
from loadtest.benchreport import DEFAULT_TIMEOUT_S, BenchConfig, RequestResult, summarize
from loadtest.report import json_text, percentile
from shared.settings import RedisSettings
from shared.tenants import Tenant

INTERACTIVE, BATCHER = "interactive", "batcher"  # tenant names when this study creates them
POLL = 0.5
FINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass(frozen=True)
class Setup:
    base_url: str
    model: str
    key: str
    batch_key: str


@dataclass
class BatchRun:
    """What the batch did, as polled."""

    id: str = ""
    status: str = ""
    created: float = 0.0
    in_progress: float | None = None
    ended: float | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0

    @property
    def lines_per_s(self) -> float:
        if self.in_progress is None or self.ended is None or self.ended <= self.in_progress:
            return math.nan
        return (self.completed + self.failed) / (self.ended - self.in_progress)


def batch_lines(model: str, lines: int, words: int, output_tokens: int, seed: int) -> bytes:
    """The batch's input file: chat lines with distinct prompts of ``words`` words."""
    rows = []
    for i in range(lines):
        messages = [{"role": "user", "content": bench.make_prompt(seed, f"batch{i}", words)}]
        body = {"model": model, "messages": messages, "max_tokens": output_tokens, "ignore_eos": True}
        rows.append(
            json.dumps(
                {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            )
        )
    return ("\n".join(rows) + "\n").encode()


async def run_batch(client: httpx.AsyncClient, data: bytes, run: BatchRun, limit_s: float) -> None:
    """Upload, create, and poll the batch until it ends (or ``limit_s`` seconds pass)."""
    upload = await client.post("/files", files={"file": ("bench.jsonl", data)}, data={"purpose": "batch"})
    upload.raise_for_status()
    body = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    created = await client.post("/batches", json=body)
    created.raise_for_status()
    run.id, run.created = created.json()["id"], time.perf_counter()
    deadline = run.created + limit_s
    while time.perf_counter() < deadline:
        state = (await client.get(f"/batches/{run.id}")).json()
        now, run.status = time.perf_counter(), state["status"]
        counts = state.get("request_counts") or {}
        run.total, run.completed, run.failed = (
            counts.get("total", 0),
            counts.get("completed", 0),
            counts.get("failed", 0),
        )
        run.output_tokens = (state.get("usage") or {}).get("output_tokens", 0)
        if run.status != "validating" and run.in_progress is None:
            run.in_progress = now
        if run.status in ("finalizing", *FINAL) and run.ended is None:
            run.ended = now
        if run.status in FINAL:
            return
        await asyncio.sleep(POLL)
    raise RuntimeError(f"batch {run.id} still {run.status} after {limit_s:.0f} s")


async def measure(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    cfg = BenchConfig(
        base_url=setup.base_url, model=setup.model, concurrency=args.concurrency, requests=0,
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, warmup=args.warmup,
        api_key=setup.key, seed=args.seed, timeout_s=args.timeout,
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {setup.batch_key}"}
    async with (
        bench.make_client(cfg) as client,
        httpx.AsyncClient(base_url=setup.base_url, headers=headers, timeout=60, trust_env=False) as api,
    ):
        words, _ = await bench.warm_up(client, cfg)
        print(f"phase 1: interactive alone, {cfg.concurrency} streams, {args.duration:.0f} s", flush=True)
        cpu0, t0 = time.process_time(), time.perf_counter()
        stop_at = t0 + args.duration
        alone, alone_wall = await bench.run_closed_loop(
            client, cfg, words, None, cfg.concurrency, "alone", stop=lambda: time.perf_counter() >= stop_at
        )
        alone_cpu = time.process_time() - cpu0
        batch_words = max(1, round(args.batch_prompt_tokens * words / max(1, args.prompt_tokens)))
        data = batch_lines(setup.model, args.lines, batch_words, args.batch_output_tokens, args.seed)
        print(f"phase 2: the same traffic beside a batch of {args.lines} lines", flush=True)
        run = BatchRun()
        cpu0 = time.process_time()
        batch = asyncio.create_task(run_batch(api, data, run, args.batch_timeout))
        beside, beside_wall = await bench.run_closed_loop(
            client, cfg, words, None, cfg.concurrency, "beside", stop=batch.done
        )
        await batch
        beside_cpu = time.process_time() - cpu0
        alone_run = None
        if args.alone_lines:
            print(f"phase 3: a batch of {args.alone_lines} lines with no interactive traffic", flush=True)
            alone_run = BatchRun()
            data = batch_lines(
                setup.model, args.alone_lines, batch_words, args.batch_output_tokens, args.seed + 1
            )
            await run_batch(api, data, alone_run, args.batch_timeout)
    window = [
        r
        for r in beside
        if run.in_progress is not None and run.in_progress <= r.sent <= (run.ended or math.inf)
    ]
    rep = report(args, cfg, words, (alone, alone_wall, alone_cpu), (window, beside_wall, beside_cpu), run)
    if alone_run is not None:
        rep["batch_alone"] = asdict(alone_run) | {"lines_per_s": alone_run.lines_per_s}
    return rep


def report(
    args: argparse.Namespace,
    cfg: BenchConfig,
    words: int,
    alone: tuple[list[RequestResult], float, float],
    beside: tuple[list[RequestResult], float, float],
    run: BatchRun,
) -> dict[str, Any]:
    a = summarize(cfg, words, alone[0], alone[1], alone[2], 0)
    b = summarize(cfg, words, beside[0], beside[1], beside[2], 0)

    def ttfts(results: list[RequestResult]) -> list[float]:
        return [r.ttft * 1000 for r in results if r.ok and r.ttft is not None]

    def ratio(x: float, y: float) -> float:
        return x / y if y else math.nan

    figures = {q: (percentile(ttfts(alone[0]), q), percentile(ttfts(beside[0]), q)) for q in (50, 95, 99)}
    return {
        "options": {k: v for k, v in vars(args).items() if "key" not in k and not isinstance(v, Path)},
        "interactive_alone": {
            "requests": a.requests_ok,
            "errors": a.errors,
            "output_tokens_per_s": a.output_tokens_per_s,
        },
        "interactive_beside_batch": {
            "requests": b.requests_ok,
            "errors": b.errors,
            "output_tokens_per_s": b.output_tokens_per_s,
        },
        "ttft_ms": {
            f"p{q}": {"alone": x, "beside_batch": y, "ratio": ratio(y, x)} for q, (x, y) in figures.items()
        },
        "batch": asdict(run)
        | {"lines_per_s": run.lines_per_s, "seconds": (run.ended or math.nan) - run.created},
        "client_cpu_pct": {
            "alone": 100 * alone[2] / alone[1],
            "beside_batch": 100 * beside[2] / max(beside[1], 1e-9),
        },
        "load_average_1m": os.getloadavg()[0],
    }


def render(rep: dict[str, Any]) -> str:
    t, batch = rep["ttft_ms"], rep["batch"]
    alone, beside, cpu = rep["interactive_alone"], rep["interactive_beside_batch"], rep["client_cpu_pct"]
    rows = [
        "interactive TTFT   alone       beside the batch",
        *(
            f"  {q:<4}       {v['alone']:7.1f} ms  {v['beside_batch']:7.1f} ms  (x{v['ratio']:.2f})"
            for q, v in t.items()
        ),
        f"requests           {alone['requests']:7d}     {beside['requests']:7d} (sent while it ran)",
        f"output tok/s       {alone['output_tokens_per_s']:7.1f}     {beside['output_tokens_per_s']:7.1f}",
        f"batch {batch['id']}: {batch['status']}, {batch['completed']} completed, {batch['failed']} failed"
        f" of {batch['total']}; {batch['lines_per_s']:.1f} lines/s while in progress,"
        f" {batch['seconds']:.1f} s from creation to the end, {batch['output_tokens']} output tokens",
        *(
            [f"batch with no interactive traffic: {rep['batch_alone']['lines_per_s']:.1f} lines/s"]
            if "batch_alone" in rep
            else []
        ),
        f"client CPU {cpu['alone']:.0f}% alone, {cpu['beside_batch']:.0f}% beside the batch;"
        f" host load average (1 min) at the end {rep['load_average_1m']:.1f}",
    ]
    return "\n".join(rows)


def run_started_system(args: argparse.Namespace) -> dict[str, Any]:
    """``switchyard up`` (which runs a jobs process), with ``--extra-jobs`` another ``switchyard
    jobs`` sharing its files directory; always stopped."""
    model_dir, args.model_name = runner.resolve_model(args.model_dir, args.model_name)
    work = Path(tempfile.mkdtemp(prefix="switchyard-batchbench-"))
    files = {"SWITCHYARD_FILES_DIR": str(work / "files")}
    with runner.switchyard_system(
        model_dir, args.model_name, args.capacity, 1, work / "system.log", args.ready_timeout, files
    ) as system:
        target = system.target
        jobs = replace(
            target, name="jobs", argv=runner.cli("jobs"), env=target.env | {"REDIS_URL": system.redis_url}
        )
        with runner.running(jobs, work / "jobs.log") if args.extra_jobs else contextlib.nullcontext():
            settings = RedisSettings(redis_url=system.redis_url)
            key, batch_key = runner.add_tenants(settings, Tenant(name=INTERACTIVE), Tenant(name=BATCHER))
            setup = Setup(target.base_url, args.model_name, key, batch_key)
            return bench.run_on_loop(measure(args, setup), not args.no_uvloop)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest batchbench", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--base-url", help="a running system, e.g. http://127.0.0.1:8000/v1 (default: start one)")
    add("--key", help="with --base-url: the interactive tenant's key")
    add("--batch-key", help="with --base-url: the key the batch is created with")
    add("--model-dir", type=Path, help="default: the demo model (built if missing)")
    add("--model-name", help="served model name (default: the demo's, the directory's, or the first listed)")
    add("--capacity", type=int, default=256, help="jobs the started worker runs at once (default: 256)")
    add("--extra-jobs", action="store_true", help="start a second jobs process beside up's own")
    add("--lines", type=int, default=1000, help="lines in the batch (default: 1000)")
    add("--batch-prompt-tokens", type=int, default=64)
    add("--batch-output-tokens", type=int, default=64)
    add("--alone-lines", type=int, default=0,
        help="then a batch of this many lines with no interactive traffic (default: 0, none)")  # fmt: skip
    add("--batch-timeout", type=float, default=1800.0, help="seconds the batch may take (default: 1800)")
    add("--concurrency", type=int, default=4, help="interactive streams (default: 4)")
    add("--duration", type=float, default=45.0, help="seconds of interactive traffic alone (default: 45)")
    add("--prompt-tokens", type=int, default=64)
    add("--output-tokens", type=int, default=64)
    add("--warmup", type=int, default=8)
    add("--seed", type=int, default=0)
    add("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per-request read timeout (s)")
    add("--ready-timeout", type=float, default=300.0)
    add("--out", type=Path, help="write every figure to this JSON file")
    add("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    if min(args.lines, args.concurrency, args.prompt_tokens, args.output_tokens, args.capacity) < 1:
        p.error("lines, concurrency, prompt and output tokens and capacity must be >= 1")
    if args.base_url is not None and not (args.key and args.batch_key):
        p.error("--base-url needs --key and --batch-key")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.base_url:
            model = args.model_name or runner.first_model(args.base_url, args.key)
            rep = bench.run_on_loop(
                measure(args, Setup(args.base_url, model, args.key, args.batch_key)), not args.no_uvloop
            )
        else:
            rep = run_started_system(args)
    except (runner.ServerError, RuntimeError, httpx.HTTPError, OSError) as exc:
        print(f"batchbench: cannot run: {exc}", file=sys.stderr)
        return 2
    print()
    print(render(rep))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json_text(rep))
        print(f"wrote {args.out}")
    ok = rep["batch"]["status"] == "completed" and not rep["batch"]["failed"]
    ok = ok and not rep["interactive_alone"]["errors"] and not rep["interactive_beside_batch"]["errors"]
    return 0 if ok else 1
