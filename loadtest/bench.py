"""Closed-loop streaming load client for OpenAI-compatible chat servers (Switchyard or vLLM).

Method
------
* Every request is a streaming ``POST /v1/chat/completions`` with ``max_tokens=N``,
  ``min_tokens=N`` and ``ignore_eos=true`` (vLLM's extra sampling parameters, which Switchyard
  accepts too) and ``stream_options.include_usage``, so each request generates exactly N tokens
  and the server reports the true prompt/completion token counts in its final usage chunk.
* Prompts are random words drawn from a fixed list with a seeded RNG, one distinct prompt per
  request index (so the prefix cache cannot turn prefill into a no-op) and identical across runs
  and servers. Token counts cannot be known client-side, so the number of words is calibrated with
  ``max_tokens=1`` probes until the server's mean ``usage.prompt_tokens`` is as close to
  ``--prompt-tokens`` as whole words allow; the report gives the prompt tokens the server actually counted.
* Closed loop: ``--concurrency`` workers each send their next request as soon as the previous
  one finishes, until ``--requests`` have completed; ``--warmup`` requests run first, unmeasured.
* Per request: TTFT (send -> first chunk carrying content), end-to-end latency (send -> end of
  stream), output tokens (from usage), chunks with non-empty content and all SSE events received
  (a server may send empty deltas, e.g. for a token that ends mid UTF-8 character), finish reason,
  error.
* Output tokens/s = sum of usage.completion_tokens / wall time of the measured phase. Inter-chunk
  time = total time between first and last content chunk / number of such gaps, all requests
  pooled; TPOT = mean over requests of (latency - TTFT) / (output tokens - 1).
* The client shares the CPU with the server, so its own CPU time (``time.process_time()``) is
  reported next to the wall time. To keep it low the SSE stream is parsed by hand from raw bytes
  (no SSE library, no SDK) and uvloop is used when installed.

Exit status: 0 when every request (warmup included) succeeded, 1 otherwise, 2 when the run could
not start (e.g. server unreachable during calibration).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import random
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from loadtest.benchreport import (
    DEFAULT_TIMEOUT_S,
    BenchConfig,
    BenchReport,
    RequestResult,
    format_report,
    summarize,
    to_json,
)
from loadtest.report import mean, write_raw

_WORD_TEXT = """
    time year people way day man thing woman life child world school state family student group
    country problem hand part place case week company system program question work government
    number night point home water room mother area money story fact month lot right study book eye
    job word business issue side kind head house service friend father power hour game line end
    member law car city community name president team minute idea kid body information back parent
    face others level office door health person art war history party result change morning reason
    research girl guy moment air teacher force education river stone garden market winter summer
    light sound music letter paper window table chair bread apple orange green yellow purple quiet
    quick slow bright dark happy simple strong gentle ancient modern little great small large young
    open close begin finish carry follow bring write speak listen travel build watch learn answer
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

CALIBRATION_PROBES = 4
T = TypeVar("T")


def make_prompt(seed: int, key: str, words: int) -> str:
    """Deterministic random-word prompt for request ``key`` (same text on every run and server)."""
    rng = random.Random(f"{seed}:{key}")
    return " ".join(rng.choices(WORDS, k=words))


def request_body(cfg: BenchConfig, prompt: str, output_tokens: int) -> bytes:
    """JSON body asking for exactly ``output_tokens`` streamed tokens plus a usage chunk."""
    body = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": output_tokens,
        "min_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def handle_event(res: RequestResult, event: bytes, data: bytes, now: float) -> bool:
    """Fold one SSE event into ``res``; returns True at ``[DONE]``. ``now`` is relative to send."""
    if data == b"[DONE]":
        return True
    res.events += 1
    obj = json.loads(data)
    if event == b"error" or "error" in obj:
        err = obj.get("error", obj)
        raise RuntimeError(f"SSE error event: {err.get('message', err) if isinstance(err, dict) else err}")
    for choice in obj.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            if res.ttft is None:
                res.ttft = now
            res.chunk_span = now - res.ttft
            res.chunks += 1
        if choice.get("finish_reason"):
            res.finish_reason = choice["finish_reason"]
    usage = obj.get("usage")
    if usage:
        res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        res.output_tokens = int(usage.get("completion_tokens") or 0)
    return False


async def consume_sse(resp: httpx.Response, res: RequestResult, t0: float) -> bool:
    """Minimal SSE parser over raw bytes (LF or CRLF, comments, event names); True if [DONE] seen."""
    buf = b""
    event = b""
    data: list[bytes] = []
    async for block in resp.aiter_bytes():
        now = time.perf_counter() - t0
        buf += block
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:  # blank line dispatches the event
                if data and handle_event(res, event, b"\n".join(data), now):
                    return True
                event, data = b"", []
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
            elif line.startswith(b"event:"):
                event = line[6:].strip()
            # ":" comments (pings), "id:", "retry:" are ignored
    return bool(data) and handle_event(res, event, b"\n".join(data), time.perf_counter() - t0)


async def one_request(client: httpx.AsyncClient, cfg: BenchConfig, prompt: str, n_out: int) -> RequestResult:
    """Send one streaming chat completion and measure it; never raises."""
    t0 = time.perf_counter()
    res = RequestResult(sent=t0)
    try:
        body = request_body(cfg, prompt, n_out)
        async with client.stream("POST", "/chat/completions", content=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                raise RuntimeError(f"HTTP {resp.status_code}: {text}")
            done = await consume_sse(resp, res, t0)
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        if res.finish_reason is None:
            raise RuntimeError("stream ended without finish_reason")
        if res.output_tokens == 0:
            raise RuntimeError("no usage chunk (stream_options.include_usage ignored?)")
        res.ok = True
    except Exception as exc:  # every failure is recorded and the run goes on
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    res.latency = time.perf_counter() - t0
    return res


async def run_closed_loop(
    client: httpx.AsyncClient,
    cfg: BenchConfig,
    words: int,
    count: int | None,
    concurrency: int,
    phase: str,
    stop: Callable[[], bool] | None = None,
    ramp: float = 0.0,
    pause: float = 0.0,
) -> tuple[list[RequestResult], float]:
    """Keep ``concurrency`` requests in flight until ``count`` are done (None: no limit) or, once
    ``stop()`` is true, until those in flight are; returns results and wall time. With ``ramp``,
    the streams start one after another over that many seconds instead of all at once: requests
    of one shape sent together keep ending together, and an engine then prefills every next one in
    the same step. With ``pause``, each stream waits a random 0 to ``pause`` seconds (seeded) after
    each answer, as a user reads it: streams whose requests once met in one engine step would
    otherwise stay in step for good, and a run's figures would depend on how many had met."""
    if count is None and stop is None:
        raise ValueError("an unlimited closed loop needs a stop condition")
    results: list[RequestResult] = []
    next_index = itertools.count() if count is None else iter(range(count))

    async def worker(number: int, delay: float) -> None:
        rng = random.Random(f"{cfg.seed}/{phase}/{number}")
        await asyncio.sleep(delay)
        for turn in itertools.count():
            if pause > 0 and turn:  # before a next request, so none follows the last answer
                await asyncio.sleep(rng.uniform(0, pause))
            if stop is not None and stop():
                return
            index = next(next_index, None)  # shared: each index is taken by exactly one worker
            if index is None:
                return
            prompt = make_prompt(cfg.seed, f"{phase}{index}", words)
            results.append(await one_request(client, cfg, prompt, cfg.output_tokens))

    workers = max(1, concurrency if count is None else min(concurrency, count))
    start = time.perf_counter()
    await asyncio.gather(*(worker(i, i * ramp / workers) for i in range(workers)))
    return results, time.perf_counter() - start


async def calibrate_words(client: httpx.AsyncClient, cfg: BenchConfig) -> int:
    """Find a word count whose prompt the server counts as about ``cfg.prompt_tokens`` tokens."""
    words = max(1, round(cfg.prompt_tokens * 0.75))
    if not cfg.calibrate:
        return words
    tried: set[int] = set()
    while words not in tried and len(tried) < 6:  # a fixed point, an oscillation, or enough
        tried.add(words)
        probes = [make_prompt(cfg.seed, f"c{i}", words) for i in range(CALIBRATION_PROBES)]
        results = await asyncio.gather(*(one_request(client, cfg, p, 1) for p in probes))
        for r in results:
            if not r.ok or r.prompt_tokens <= 0:
                raise RuntimeError(f"calibration request failed: {r.error or 'no prompt_tokens in usage'}")
        counted = mean([r.prompt_tokens for r in results])
        words = max(1, round(words * cfg.prompt_tokens / counted))
    return words


def make_client(cfg: BenchConfig) -> httpx.AsyncClient:
    """One pooled HTTP/1.1 client sized for the concurrency; no env proxies, generous read timeout."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    limits = httpx.Limits(max_connections=cfg.concurrency + 8, max_keepalive_connections=cfg.concurrency + 8)
    timeout = httpx.Timeout(cfg.timeout_s, connect=30.0)
    return httpx.AsyncClient(
        base_url=cfg.base_url.rstrip("/"), headers=headers, limits=limits, timeout=timeout, trust_env=False
    )


async def warm_up(client: httpx.AsyncClient, cfg: BenchConfig) -> tuple[int, int]:
    """Calibrate the prompt, then run ``cfg.warmup`` unmeasured requests; (prompt words, failed
    warm-up requests)."""
    words = await calibrate_words(client, cfg)
    if cfg.warmup <= 0:
        return words, 0
    warm, _ = await run_closed_loop(client, cfg, words, cfg.warmup, cfg.concurrency, "w")
    return words, sum(1 for r in warm if not r.ok)


async def run_bench(cfg: BenchConfig) -> BenchReport:
    """Calibrate the prompt, run the warmup, then the measured closed-loop phase."""
    async with make_client(cfg) as client:
        words, warm_errors = await warm_up(client, cfg)
        cpu0 = time.process_time()
        results, wall = await run_closed_loop(client, cfg, words, cfg.requests, cfg.concurrency, "m")
        cpu = time.process_time() - cpu0
    return summarize(cfg, words, results, wall, cpu, warm_errors)


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path | None, bool]:
    """Command line -> (config, JSON output path, use uvloop)."""
    p = argparse.ArgumentParser(prog="python -m loadtest bench", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per-request read timeout (s)")
    p.add_argument("--no-calibrate", action="store_true", help="use 0.75 words per prompt token, no probes")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--json", type=Path, default=None,
                   help="write every figure, each request's too, gzip-compressed, as NAME.gz")  # fmt: skip
    a = p.parse_args(argv)
    if a.concurrency < 1 or a.requests < 1 or a.output_tokens < 1 or a.prompt_tokens < 1 or a.warmup < 0:
        p.error("concurrency, requests, prompt/output tokens must be >= 1 and warmup >= 0")
    cfg = BenchConfig(
        base_url=a.base_url, model=a.model, concurrency=a.concurrency, requests=a.requests,
        prompt_tokens=a.prompt_tokens, output_tokens=a.output_tokens, warmup=a.warmup,
        api_key=a.api_key, seed=a.seed, timeout_s=a.timeout, calibrate=not a.no_calibrate,
    )  # fmt: skip
    return cfg, a.json, not a.no_uvloop


def run_on_loop(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    """Run ``main`` on a fresh event loop: uvloop when available and wanted, to spare the client CPU."""
    if use_uvloop and importlib.util.find_spec("uvloop") is not None:
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def run(cfg: BenchConfig, use_uvloop: bool = True) -> BenchReport:
    """Run the benchmark on a fresh event loop."""
    return run_on_loop(run_bench(cfg), use_uvloop)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, json_path, use_uvloop = parse_args(argv)
    try:
        rep = run(cfg, use_uvloop)
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"bench: cannot run: {exc}", file=sys.stderr)
        return 2
    print(format_report(rep))
    if json_path is not None:
        write_raw(json_path, to_json(rep))
    if rep.token_mismatches:
        print(f"WARNING: {rep.token_mismatches} requests did not generate exactly {cfg.output_tokens} tokens")
    return 1 if rep.errors or rep.warmup_errors else 0
