"""Autoscaling from zero, watched: a burst arrives while the model has no worker, workers come, the
burst completes, workers go.

    python -m loadtest autoscale                       # the real engine on the demo model
    python -m loadtest autoscale --engine sim --max 4  # the simulated engine (fast)

Starts ``switchyard up --autoscale 0:MAX`` on free ports, waits until it has scaled to zero, sends
``--requests`` streamed requests at once, samples the model's backlog, workers and completed
requests every ``--every`` seconds from the gateway's ``/scaling`` (on its metrics port) until it
is back at zero, and writes ``timeline.json``, ``timeline.png`` and ``summary.md`` to ``--out``.
Every request must end with its full output: the study fails otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from redis.asyncio import Redis

from control.processes import free_port
from loadtest import runner
from loadtest.report import chart, json_text, results_dir
from shared.fleet import gather
from shared.names import Names


@dataclass
class Sample:
    t: float
    waiting: int
    running: int
    workers: int
    desired: int
    completed: int


@dataclass
class Burst:
    requests: int
    tokens: int
    sent_at: float = 0.0
    ttft: list[float] = field(default_factory=list)
    """Seconds from the burst to each request's first token."""
    ends: list[tuple[str | None, int, str | None]] = field(default_factory=list)
    """(finish reason, tokens, error) of each request."""

    @property
    def whole(self) -> int:
        return sum(
            1 for finish, tokens, error in self.ends if error is None and finish and tokens == self.tokens
        )


async def scaling(http: httpx.AsyncClient, internal_url: str, model: str) -> dict[str, float]:
    """The gateway's scaling figures for ``model``, from its metrics port (``internal_url``)."""
    reply = await http.get(f"{internal_url}/scaling", params={"model": model})
    body: dict[str, float] = reply.raise_for_status().json()
    return body


async def fleet(redis: Redis, model: str) -> tuple[int, int, int]:
    """(waiting, running, live workers) of ``model``, read from Redis as the autoscaler reads it."""
    snap = await gather(redis, Names(), worker_ttl=3)
    return snap.waiting(model), snap.running(model), len(snap.serving(model))


async def one(http: httpx.AsyncClient, key: str, model: str, burst: Burst) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about the harbour."}],
        "max_tokens": burst.tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    finish, tokens, first = None, 0, None
    try:
        async with http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=600
        ) as resp:
            if resp.status_code != 200:
                burst.ends.append((None, 0, f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"))
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    burst.ends.append((finish, tokens, str(chunk["error"])))
                    return
                if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.monotonic()
                    burst.ttft.append(first - burst.sent_at)
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    finish = chunk["choices"][0]["finish_reason"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        burst.ends.append((finish, tokens, repr(exc)))
        return
    burst.ends.append((finish, tokens, None))


async def watch_burst(
    base_url: str,
    internal_url: str,
    redis_url: str,
    key: str,
    model: str,
    burst: Burst,
    every: float,
    settle: float,
) -> list[Sample]:
    """Send the burst, sample until every request ended and the model is back at zero workers (or
    ``settle`` seconds after the last request ended), and return the timeline."""
    samples: list[Sample] = []
    redis = Redis.from_url(redis_url)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        burst.sent_at = time.monotonic()
        requests = [asyncio.create_task(one(http, key, model, burst)) for _ in range(burst.requests)]
        ended_at = None
        while True:
            waiting, running, workers = await fleet(redis, model)
            desired = int((await scaling(http, internal_url, model)).get("desired_workers", 0))
            now = time.monotonic()
            samples.append(
                Sample(
                    t=round(now - burst.sent_at, 2),
                    waiting=waiting,
                    running=running,
                    workers=workers,
                    desired=desired,
                    completed=len(burst.ends),
                )
            )
            if all(r.done() for r in requests):
                ended_at = ended_at or now
                if samples[-1].workers == 0 or now - ended_at > settle:
                    break
            await asyncio.sleep(every)
        await asyncio.gather(*requests)
    await redis.aclose()
    return samples


async def until_zero(redis_url: str, model: str, limit: float) -> float:
    """Seconds until the model has no worker (it scaled to zero)."""
    begun = time.monotonic()
    redis = Redis.from_url(redis_url)
    try:
        while time.monotonic() - begun < limit:
            if (await fleet(redis, model))[2] == 0:
                return time.monotonic() - begun
            await asyncio.sleep(0.5)
    finally:
        await redis.aclose()
    raise TimeoutError(f"{model} did not scale to zero in {limit:.0f}s")


def write_chart(samples: list[Sample], path: Path, title: str) -> None:
    """Requests waiting, running and completed over time above live and desired workers."""
    t = [s.t for s in samples]
    with chart(path, 2, 1, figsize=(9, 6), sharex=True) as (fig, (top, bottom)):
        top.plot(t, [s.waiting for s in samples], label="waiting")
        top.plot(t, [s.running for s in samples], label="running")
        top.plot(t, [s.completed for s in samples], label="completed")
        top.set_ylabel("requests")
        top.legend()
        bottom.step(t, [s.workers for s in samples], where="post", label="live workers")
        bottom.step(t, [s.desired for s in samples], where="post", linestyle="--", label="desired")
        bottom.set_ylabel("workers")
        bottom.set_xlabel("seconds since the burst")
        bottom.legend()
        fig.suptitle(title)


def summary(args: argparse.Namespace, burst: Burst, samples: list[Sample], to_zero: float) -> str:
    ttft = sorted(burst.ttft)
    first_worker = next((s.t for s in samples if s.workers > 0), None)
    lost = burst.requests - burst.whole
    return "\n".join(
        [
            f"# Autoscaling from zero ({args.engine} engine, up to {args.max} workers)",
            "",
            f"- burst: {burst.requests} streamed requests of {burst.tokens} tokens, sent at once to a "
            f"model with no worker (scaled to zero {to_zero:.0f}s after start-up)",
            f"- first worker live after {first_worker if first_worker is not None else '-'} s; most "
            f"workers at once {max(s.workers for s in samples)}",
            f"- time to first token: first {ttft[0]:.1f} s, median {ttft[len(ttft) // 2]:.1f} s, "
            f"last {ttft[-1]:.1f} s"
            if ttft
            else "- no request produced a token",
            f"- requests completed whole: {burst.whole} of {burst.requests} (lost or cut: {lost})",
            f"- back at zero workers: {samples[-1].workers == 0} ({samples[-1].t:.0f} s after the burst)",
            "",
            "![timeline](timeline.png)",
            "",
        ]
    )


def up_flags(
    args: argparse.Namespace, port: int, redis_port: int, metrics_port: int
) -> tuple[list[str], dict[str, str]]:
    """``switchyard up --autoscale 0:MAX`` as this run wants it: its flags and settings."""
    flags = ["--autoscale", f"0:{args.max}", "--port", str(port), "--redis-port", str(redis_port)]
    flags += ["--metrics-port", str(metrics_port)]
    flags += ["--capacity", str(args.capacity), "--engine", args.engine]
    if args.engine == "sim":
        flags += ["--sim-preset", args.sim_preset]
    env = {
        "XDG_CONFIG_HOME": str(args.out / "config"),
        "SWITCHYARD_SCALE_DOWN_AFTER": str(args.scale_down_after),
        "SWITCHYARD_SCALE_COOLDOWN": str(args.cooldown),
        "SWITCHYARD_HEARTBEAT_INTERVAL": "0.5",
        "SWITCHYARD_WORKER_TTL": "3",
    }
    return flags, env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest autoscale", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    p.add_argument("--sim-preset", default="cpu-demo")
    p.add_argument("--max", type=int, default=2, help="most workers (default: 2)")
    p.add_argument("--capacity", type=int, default=8, help="jobs one worker runs at once (default: 8)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--scale-down-after", type=float, default=10.0)
    p.add_argument("--cooldown", type=float, default=5.0)
    p.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--out", type=Path, default=results_dir("autoscale"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    port, redis_port, metrics_port = free_port(), free_port(), free_port()
    log = args.out / "up.log"
    base, internal = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
    flags, env = up_flags(args, port, redis_port, metrics_port)
    try:
        with runner.serving(runner.up("switchyard up", flags, env, port), log):
            key = (args.out / "config" / "switchyard" / "dev-key").read_text().strip()
            listed = httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {key}"}).json()
            model = listed["data"][0]["id"]
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            to_zero = asyncio.run(until_zero(redis_url, model, 300))
            burst = Burst(args.requests, args.tokens)
            samples = asyncio.run(
                watch_burst(base, internal, redis_url, key, model, burst, args.every, settle=120)
            )
    except runner.ServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    (args.out / "config" / "switchyard" / "dev-key").unlink(missing_ok=True)
    doc = {"args": {k: str(v) for k, v in vars(args).items()}, "burst": asdict(burst)}
    (args.out / "timeline.json").write_text(json_text(doc | {"samples": [asdict(s) for s in samples]}))
    write_chart(
        samples, args.out / "timeline.png", f"burst of {burst.requests} from zero workers ({args.engine})"
    )
    text = summary(args, burst, samples, to_zero)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0 if burst.whole == burst.requests else 1
