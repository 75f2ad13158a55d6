"""The floor under the gateway's CPU: what its stack costs per request and per SSE event with none
of Switchyard's work in it.

A FastAPI app served as the gateway serves its own (uvicorn with httptools and uvloop, the gateway's
connection protocol, access log off), whose one route validates a chat body as the gateway does
(:class:`api.chat.protocol.ChatCompletionRequest`) and streams ``max_tokens`` chunk events and
``[DONE]`` through the gateway's :class:`~gateway.sse.EventStream`: no key, no Redis, no prompt
rendered, no reply relayed. A closed-loop client sends the same requests at two event counts; the
server process's CPU over each level is fitted to ``a * requests + b * events`` as ``pathcost``
fits the gateway's, so the two read side by side::

    python -m loadtest floor                                   # 64 streams, 2,000 requests a level
    python -m loadtest pathcost --no-vllm --output-tokens 16,128   # the gateway's own split
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from api.chat.protocol import ChatCompletionRequest
from api.sse import DONE, encode
from control.processes import answers_ok, free_port, stop_process, wait_until
from gateway.sse import EventStream
from loadtest import proctree
from loadtest.pathcost import fit
from loadtest.report import markdown_table

PROMPT = "hello world these are some words " * 8


@dataclass
class FloorLevel:
    events: int
    requests: int
    cpu_s: float
    wall_s: float


def app() -> FastAPI:
    """The app the server process runs (``--serve``)."""
    chunk = {"id": "chatcmpl-floor", "object": "chat.completion.chunk", "created": 0, "model": "floor"}
    event = encode({**chunk, "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]})
    floor = FastAPI()

    async def events(count: int) -> AsyncIterator[bytes]:
        for _ in range(count - 1):
            yield event
        yield event + DONE

    @floor.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> EventStream:
        return EventStream(events(max(1, body.max_tokens or 1)), ping=10)

    return floor


def serve(port: int) -> None:
    import uvicorn

    from control.serve import collect_rarely, server_config
    from shared.settings import GatewaySettings

    collect_rarely()
    config = server_config(app(), GatewaySettings(), host="127.0.0.1", port=port, lifespan="off")
    uvicorn.Server(config).run()


async def drive(port: int, streams: int, requests: int, events: int) -> float:
    """``requests`` streamed requests of ``events`` events each, ``streams`` at a time; wall seconds."""
    body = {
        "model": "floor",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": events,
        "stream": True,
    }
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as client:
        left = requests

        async def stream() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    resp.raise_for_status()
                    got = b"".join([part async for part in resp.aiter_bytes()])
                if got.count(b"data: ") != events + 1 or not got.endswith(b"data: [DONE]\n\n"):
                    raise RuntimeError(f"expected {events} chunks and [DONE], got {got[-200:]!r}")

        begun = time.monotonic()
        await asyncio.gather(*(stream() for _ in range(streams)))
        return time.monotonic() - begun


def measure(pid: int, port: int, streams: int, requests: int, events: int) -> FloorLevel:
    before = proctree.own_seconds([pid])
    wall = asyncio.run(drive(port, streams, requests, events))
    return FloorLevel(events, requests, proctree.own_seconds([pid]) - before, wall)


def table(levels: list[FloorLevel], streams: int) -> str:
    rows = [["events a request", "requests", "requests/s", "server CPU ms per request"]]
    for lv in levels:
        per = 1e3 * lv.cpu_s / lv.requests
        rows.append([str(lv.events), str(lv.requests), f"{lv.requests / lv.wall_s:.0f}", f"{per:.3f}"])
    out = markdown_table(rows, "rrrr")
    if len({lv.events for lv in levels}) >= 2:
        # Events as pathcost counts them: the chunks, [DONE] aside (it goes out with the last one).
        a, b, worst = fit([(lv.requests, lv.requests * lv.events, lv.cpu_s) for lv in levels])
        out += f"\n\nfloor at {streams} streams: {1e3 * a:.3f} ms per request, {1e3 * b:.4f} ms per SSE event"
        out += f" (worst miss of the fit {100 * worst:.0f}%)"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest floor", description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--requests", type=int, default=2000, help="per level")
    p.add_argument("--events", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):  # how `python -m loadtest` takes the stop signal
            serve(args.serve)
        return 0
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "loadtest", "floor", "--serve", str(port)])
    try:

        def exited() -> None:
            if server.poll() is not None:
                raise RuntimeError(f"the floor's server exited at start with status {server.returncode}")

        ready = f"http://127.0.0.1:{port}/openapi.json"  # FastAPI's own route: served once the app is
        if not wait_until(lambda: answers_ok(ready, timeout=1), 60, interval=0.1, watch=exited):
            raise RuntimeError("the floor's server did not start in 60 s")
        measure(server.pid, port, args.streams, max(200, args.requests // 10), args.events[-1])  # warm-up
        levels = [measure(server.pid, port, args.streams, args.requests, n) for n in args.events]
    finally:
        stop_process(server, grace=5)
    print(table(levels, args.streams))
    return 0
