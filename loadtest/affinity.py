"""Prefix affinity, measured: multi-turn conversations on two real vLLM workers, with and without it.

    python -m loadtest affinity                     # 16 conversations of 4 turns, twice
    python -m loadtest affinity --conversations 32 --turns 6 --first-words 400
    python -m loadtest affinity --tenants 4 --shared-words 200   # what the per-tenant cache costs

Each phase starts its own ``switchyard up --workers 2`` on the demo model (cold prefix caches), with
``SWITCHYARD_PREFIX_AFFINITY`` off, then on. Conversations run concurrently: each opens with a long
first message of its own, and every turn sends the whole conversation so far (earlier questions and
answers) plus a short new question, so each turn's prompt starts with the previous turn's. Reported
per phase: TTFT of the first turns and of the later ones (the ones a prefix cache can serve), vLLM's
own prefix-cache hit rate summed over both workers (``vllm:prefix_cache_hits`` / ``queries`` from
their metrics), and how many jobs each worker ran. Written as ``affinity.json`` and ``summary.md``.

With ``--tenants N`` the conversations are spread over N tenants and open with a preamble every
one of them shares (``--shared-words``, a common system prompt, say); the two phases then both
have affinity on and differ in ``SWITCHYARD_PREFIX_CACHE_SCOPE``: ``shared`` (one cache for
everyone) and ``tenant`` (each tenant its own), which is what keeping tenants' caches apart costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from redis.asyncio import Redis

from control.processes import free_port
from loadtest import runner
from loadtest.report import cut_point, json_text, markdown_table, results_dir
from shared.names import Names
from shared.tenants import Tenant, TenantStore

KEY = "sy-0123456789ab-affinityaffinityaffinityaffinityaffini"
WORDS = [
    *("harbour", "lantern", "quiet", "river", "stone", "market"),
    *("bridge", "window", "orchard", "silver", "meadow", "candle"),
]


@dataclass
class Phase:
    affinity: bool
    scope: str | None = None
    """``SWITCHYARD_PREFIX_CACHE_SCOPE`` of this phase, where the study sets it."""
    first_turn_ttft_ms: list[float] = field(default_factory=list)
    later_turn_ttft_ms: list[float] = field(default_factory=list)
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    jobs_per_worker: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def figures(self) -> dict[str, float]:
        return {
            "first_turn_ttft_p50_ms": cut_point(self.first_turn_ttft_ms, 50),
            "later_turn_ttft_p50_ms": cut_point(self.later_turn_ttft_ms, 50),
            "later_turn_ttft_p95_ms": cut_point(self.later_turn_ttft_ms, 95),
            "prefix_cache_hit_rate": round(self.hit_rate, 3),
        }


def worker_metrics(ports: list[int]) -> tuple[float, float, list[float]]:
    """(prefix-cache hits, queries, jobs completed) summed over the workers' metrics endpoints."""
    hits = queries = 0.0
    jobs = []
    for port in ports:
        text = runner.scrape(f"http://127.0.0.1:{port}/metrics")
        hits += runner.counter(text, "vllm:prefix_cache_hits")
        queries += runner.counter(text, "vllm:prefix_cache_queries")
        jobs.append(runner.counter(text, "switchyard:worker_jobs", outcome="completed"))
    return hits, queries, jobs


def preamble(args: argparse.Namespace) -> list[dict[str, str]]:
    """What every conversation opens with: a system message of ``--shared-words``, if any."""
    if not args.shared_words:
        return []
    rng = random.Random(args.seed - 1)
    words = " ".join(rng.choice(WORDS) for _ in range(args.shared_words))
    return [{"role": "system", "content": f"You answer questions about this text. {words}"}]


async def conversation(
    http: httpx.AsyncClient, rng: random.Random, args: argparse.Namespace, phase: Phase, key: str
) -> None:
    opening = " ".join(rng.choice(WORDS) for _ in range(args.first_words))
    messages = [*preamble(args), {"role": "user", "content": f"Read this and answer my questions. {opening}"}]
    headers = {"authorization": f"Bearer {key}"}
    for turn in range(args.turns):
        body = {"model": "switchyard-demo", "messages": messages, "max_tokens": args.reply_tokens,
                "stream": True, "ignore_eos": True}  # fmt: skip
        begun, first, text = time.monotonic(), None, []
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                phase.errors += 1
                return
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        first = first or time.monotonic()
                        text.append(chunk["choices"][0]["delta"]["content"])
        if first is None:
            phase.errors += 1
            return
        ttft = (first - begun) * 1000
        (phase.first_turn_ttft_ms if turn == 0 else phase.later_turn_ttft_ms).append(ttft)
        question = " ".join(rng.choice(WORDS) for _ in range(args.question_words))
        messages += [{"role": "assistant", "content": "".join(text)}, {"role": "user", "content": question}]


async def tenant_keys(redis_url: str, tenants: int) -> list[str]:
    """A key for each of the study's tenants (the first is the dev key's), none of them limited."""
    if tenants <= 1:
        return [KEY]
    redis = Redis.from_url(redis_url)
    try:
        store = TenantStore(redis, Names())
        keys = []
        for i in range(tenants):
            await store.put_tenant(Tenant(name=f"study-{i}", rpm=0, tpm=0, max_concurrent=0, max_backlog=0))
            keys.append(await store.add_key(f"study-{i}"))
        return keys
    finally:
        await redis.aclose()


async def drive(base_url: str, redis_url: str, args: argparse.Namespace, phase: Phase) -> None:
    keys = await tenant_keys(redis_url, args.tenants)
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        rngs = [random.Random(args.seed + i) for i in range(args.conversations)]
        await asyncio.gather(
            *(conversation(http, rng, args, phase, keys[i % len(keys)]) for i, rng in enumerate(rngs))
        )


def run_phase(args: argparse.Namespace, affinity: bool, scope: str | None = None) -> Phase:
    phase = Phase(affinity, scope)
    port, redis_port = free_port(), free_port()
    metrics = [free_port(), free_port()]
    env = {"SWITCHYARD_DEV_KEY": KEY, "XDG_CONFIG_HOME": str(args.out / "config")}
    env |= {"SWITCHYARD_PREFIX_AFFINITY": str(affinity).lower(), "SWITCHYARD_METRICS_PORT": str(metrics[0])}
    if scope is not None:
        env["SWITCHYARD_PREFIX_CACHE_SCOPE"] = scope
    flags = ["--workers", "2", "--port", str(port)]
    flags += ["--redis-port", str(redis_port), "--max-model-len", "2048", "--dtype", args.dtype]
    log = args.out / f"up-affinity-{'on' if affinity else 'off'}{f'-{scope}' if scope else ''}.log"
    with runner.serving(runner.up("switchyard up", flags, env, port), log):
        ports = [int(line.rsplit(":", 1)[1].split("/")[0]) for line in log.read_text().splitlines()
                 if line.strip().startswith("worker-") and "/metrics" in line]  # fmt: skip
        hits0, queries0, jobs0 = worker_metrics(ports)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        asyncio.run(drive(f"http://127.0.0.1:{port}", redis_url, args, phase))
        hits1, queries1, jobs1 = worker_metrics(ports)
        phase.prefix_hits, phase.prefix_queries = hits1 - hits0, queries1 - queries0
        phase.jobs_per_worker = [b - a for a, b in zip(jobs0, jobs1, strict=True)]
    return phase


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest affinity", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first-words", type=int, default=300)
    p.add_argument("--question-words", type=int, default=12)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--tenants", type=int, default=1, help="spread conversations over N tenants")
    p.add_argument("--shared-words", type=int, default=0, help="a preamble every conversation shares")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=results_dir("affinity"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tenants > 1:
        phases = [run_phase(args, True, scope) for scope in ("shared", "tenant")]
    else:
        phases = [run_phase(args, affinity) for affinity in (False, True)]
    columns = [
        "prefix affinity", "cache scope", "first-turn TTFT p50 ms", "later-turn TTFT p50 ms",
        "later-turn TTFT p95 ms",
        "vLLM prefix-cache hit rate", "jobs per worker", "errors",
    ]  # fmt: skip
    rows = [columns]
    for ph in phases:
        f = ph.figures()
        cells = [
            "on" if ph.affinity else "off",
            ph.scope or "default",
            *(
                f"{f[k]:.0f}"
                for k in ("first_turn_ttft_p50_ms", "later_turn_ttft_p50_ms", "later_turn_ttft_p95_ms")
            ),
            f"{f['prefix_cache_hit_rate']:.1%}",
            ", ".join(f"{j:.0f}" for j in ph.jobs_per_worker),
            str(ph.errors),
        ]
        rows.append(cells)
    text = "\n".join(
        [
            f"# Prefix affinity on a multi-turn workload ({datetime.now(UTC):%Y-%m-%d}, "
            f"{os.cpu_count()} cores)",
            "",
            f"`switchyard up --workers 2`, demo model, {args.conversations} concurrent conversations of "
            f"{args.turns} turns: a {args.first_words}-word opening, then {args.question_words}-word "
            f"questions, {args.reply_tokens}-token answers."
            + (
                f" The conversations belong to {args.tenants} tenants and all open with the same "
                f"{args.shared_words}-word system message."
                if args.tenants > 1
                else ""
            ),
            "",
            markdown_table(rows, "llrrrrlr"),
            "",
        ]
    )
    (args.out / "summary.md").write_text(text)
    (args.out / "affinity.json").write_text(json_text([asdict(p) | p.figures() for p in phases]))
    print(text)
    return 0 if all(p.errors == 0 for p in phases) else 1
