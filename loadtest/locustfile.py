"""Locust users that speak the OpenAI chat API over HTTP, with LLM metrics in Locust's own statistics.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --api-keys key-a,key-b \\
        --prompt-tokens 64 --output-tokens 128 --stream-weight 3 --nonstream-weight 1

Each user sends chat completions back to back (closed loop: concurrency = users), streaming or not
as the weights say, each asking for exactly ``--output-tokens`` tokens (``max_tokens`` with
``ignore_eos``) with a distinct random-word prompt. Users take the API keys round-robin
(``Authorization: Bearer <key>``, ``--api-keys`` or ``LOCUST_API_KEYS``, comma-separated).

Rows in Locust's statistics (and CSVs):

* ``POST /v1/chat/completions`` — every request, both kinds; response time = until the last byte.
  Failures: HTTP errors, SSE ``error`` events, a stream without ``[DONE]``, a token count other
  than asked.
* ``TTFT stream`` — time to the first content chunk of a streamed request (ms).
* ``TPOT stream`` — time per output token after the first, (latency - TTFT) / (tokens - 1) (ms).
* ``TOKENS/S stream`` / ``TOKENS/S non-stream`` — per request, output tokens/s in the "response
  time" column and output tokens in "content size", so Requests/s x Average Content Size is the
  aggregate output tokens/s.

Locust's "Aggregated" row mixes these together; read the rows by type. Locust rounds response
times above 100 to 2 significant digits in its percentiles; the averages are exact.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from locust import FastHttpUser, constant, events, task
from locust import stats as locust_stats
from locust.env import Environment

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # Locust loads this file by path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import workload as wl
from loadtest.bench import RequestResult, handle_event

REQUEST_NAME = wl.CHAT_PATH
TTFT, TPOT, TOKENS = "TTFT", "TPOT", "TOKENS/S"
STREAM, NON_STREAM = "stream", "non-stream"
log = logging.getLogger("loadtest")

# Locust flushes its CSVs every 10 s; sweep.py follows a run's progress in them, so flush every second.
locust_stats.CSV_STATS_FLUSH_INTERVAL_SEC = 1


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    g = parser.add_argument_group("OpenAI chat workload")
    g.add_argument("--model", default="", env_var="LOCUST_MODEL", help="default: first of GET /v1/models")
    g.add_argument("--api-keys", default="", env_var="LOCUST_API_KEYS", help="comma-separated, round-robin")
    g.add_argument("--prompt-tokens", type=int, default=64, env_var="LOCUST_PROMPT_TOKENS",
                   help="prompt length the server should count; calibrated at start")  # fmt: skip
    g.add_argument("--prompt-words", type=int, default=0, env_var="LOCUST_PROMPT_WORDS",
                   help="words per prompt; skips calibration")  # fmt: skip
    g.add_argument("--output-tokens", type=int, default=128, env_var="LOCUST_OUTPUT_TOKENS")
    g.add_argument("--stream-weight", type=int, default=1, env_var="LOCUST_STREAM_WEIGHT")
    g.add_argument("--nonstream-weight", type=int, default=0, env_var="LOCUST_NONSTREAM_WEIGHT")
    g.add_argument("--prompt-seed", type=int, default=0, env_var="LOCUST_PROMPT_SEED")


def resolve_workload(environment: Environment) -> wl.Workload:
    """The options as a Workload, asking the server for what was not given (model, prompt words)."""
    opts = environment.parsed_options
    if opts is None:
        raise RuntimeError("no parsed options: run this file with the locust command")
    keys = wl.parse_keys(opts.api_keys)
    if opts.stream_weight < 0 or opts.nonstream_weight < 0 or opts.stream_weight + opts.nonstream_weight < 1:
        raise ValueError("--stream-weight and --nonstream-weight must be >= 0 and not both 0")
    work = wl.Workload(
        model=opts.model, prompt_words=opts.prompt_words, output_tokens=opts.output_tokens,
        stream_weight=opts.stream_weight, nonstream_weight=opts.nonstream_weight, api_keys=keys,
        seed=opts.prompt_seed,
    )  # fmt: skip
    if work.model and work.prompt_words > 0:
        return work
    with wl.make_client(environment.host or "", keys) as client:
        model = work.model or wl.discover_model(client)
        words, counted = work.prompt_words, float("nan")
        if words <= 0:
            words, counted = wl.calibrate_words(
                client, wl.Workload(model, 1, 1, seed=work.seed), opts.prompt_tokens
            )
    log.info("model %s, prompt %d words (%.1f tokens counted by the server)", model, words, counted)
    return wl.Workload(
        model, words, work.output_tokens, work.stream_weight, work.nonstream_weight, keys, work.seed
    )


@events.test_start.add_listener
def on_test_start(environment: Environment, **_: Any) -> None:
    try:
        ChatUser.workload = resolve_workload(environment)
    except Exception as exc:  # cannot run at all: say why and stop with a distinct exit code
        log.error("cannot start the chat workload: %s: %s", type(exc).__name__, exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            environment.runner.quit()
        return
    ChatUser.user_numbers = itertools.count()


class SseLines:
    """Assembles SSE events from lines and folds them into a RequestResult (bench.handle_event)."""

    def __init__(self, result: RequestResult) -> None:
        self.result = result
        self.event = b""
        self.data: list[bytes] = []

    def feed(self, line: bytes, now: float) -> bool:
        """One line (terminator included); True once ``[DONE]`` arrived."""
        line = line.rstrip(b"\r\n")
        if not line:
            done = bool(self.data) and handle_event(self.result, self.event, b"\n".join(self.data), now)
            self.event, self.data = b"", []
            return done
        if line.startswith(b"data:"):
            self.data.append(line[5:].lstrip(b" "))
        elif line.startswith(b"event:"):
            self.event = line[6:].strip()
        return False  # ":" comments (pings), "id:", "retry:" carry nothing we measure


def check_result(res: RequestResult, expected_tokens: int, done: bool) -> str | None:
    """Why a finished request counts as failed, or None."""
    if not done:
        return "stream ended without [DONE]"
    if res.finish_reason is None:
        return "no finish_reason"
    if res.output_tokens != expected_tokens:
        return f"asked for {expected_tokens} tokens, usage says {res.output_tokens}"
    return None


class ChatUser(FastHttpUser):
    """One client sending chat completions back to back."""

    wait_time = constant(0)
    network_timeout = 600.0
    connection_timeout = 30.0
    concurrency = 1  # one request at a time per user
    workload: ClassVar[wl.Workload | None] = None
    user_numbers: ClassVar[itertools.count[int]] = itertools.count()

    def on_start(self) -> None:
        work = self.workload
        if work is None:  # test_start failed and the runner is quitting
            self.stop()
            return
        self.number = next(self.user_numbers)
        key = work.api_keys[self.number % len(work.api_keys)] if work.api_keys else None
        self.headers = {"Content-Type": "application/json", **wl.auth_headers(key)}
        self.sent = 0

    def record(self, kind: str, name: str, value: float, length: int = 0) -> None:
        """One sample of an LLM metric as a Locust request entry."""
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=value, response_length=length, exception=None,
            context={},
        )  # fmt: skip

    @task
    def chat(self) -> None:
        work = self.workload
        assert work is not None
        self.sent += 1
        stream = random.choices((True, False), (work.stream_weight, work.nonstream_weight))[0]
        body = work.body(f"u{self.number}r{self.sent}", stream)
        if stream:
            self.stream_chat(work, body)
        else:
            self.plain_chat(work, body)

    def stream_chat(self, work: wl.Workload, body: str) -> None:
        t0 = time.perf_counter()
        res = RequestResult(sent=t0)
        headers = self.headers | {"Accept": "text/event-stream"}
        with self.client.post(
            wl.CHAT_PATH, data=body, headers=headers, name=REQUEST_NAME, stream=True, catch_response=True
        ) as resp:
            if resp.status_code != 200:  # 0: connection error, already recorded as the failure
                if resp.status_code:
                    resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                done, size = read_stream(resp._response, SseLines(res), t0)
            except Exception as exc:  # broken stream, SSE error event, bad JSON: a failed request
                resp.failure(f"{type(exc).__name__}: {exc}"[:300])
                return
            latency = time.perf_counter() - t0
            resp.request_meta["response_time"] = latency * 1000
            resp.request_meta["response_length"] = size
            problem = check_result(res, work.output_tokens, done)
            if problem:
                resp.failure(problem)
                return
        self.record_tokens(STREAM, res, latency)

    def plain_chat(self, work: wl.Workload, body: str) -> None:
        t0 = time.perf_counter()
        res = RequestResult(sent=t0)
        with self.client.post(wl.CHAT_PATH, data=body, headers=self.headers, name=REQUEST_NAME,
                              catch_response=True) as resp:  # fmt: skip
            latency = time.perf_counter() - t0
            if resp.status_code != 200:
                if resp.status_code:
                    resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                doc = resp.json()
                res.finish_reason = doc["choices"][0]["finish_reason"]
                res.output_tokens = int(doc["usage"]["completion_tokens"])
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                resp.failure(f"unexpected body: {type(exc).__name__}: {exc}")
                return
            problem = check_result(res, work.output_tokens, done=True)
            if problem:
                resp.failure(problem)
                return
        self.record_tokens(NON_STREAM, res, latency)

    def record_tokens(self, kind: str, res: RequestResult, latency: float) -> None:
        """TTFT and TPOT (streams only) and output tokens/s of one successful request."""
        if kind == STREAM and res.ttft is not None:
            self.record(TTFT, kind, res.ttft * 1000)
            if res.output_tokens > 1:
                self.record(TPOT, kind, (latency - res.ttft) * 1000 / (res.output_tokens - 1))
        self.record(TOKENS, kind, res.output_tokens / latency if latency > 0 else 0.0, res.output_tokens)


def read_stream(raw: Any, sse: SseLines, t0: float) -> tuple[bool, int]:
    """Read SSE lines as they arrive (geventhttpclient's readline returns each at once); ([DONE]?, bytes)."""
    size = 0
    while True:
        line = raw.readline(b"\n")
        if not line:
            return False, size
        size += len(line)
        if sse.feed(line, time.perf_counter() - t0):
            size += len(raw.read())  # the end of the chunked body, so the connection can be reused
            return True, size
