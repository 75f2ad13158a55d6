"""The Batch API's pure rules, as tables: input lines, batch checks, result lines, pacing, retries,
status moves, the cron schedule, dead-letter trim points and usage roll-ups."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest

from api.errors import APIError, InvalidRequest, Timeout, Unavailable, UpstreamFailure, from_status
from batch.housekeeping import trim_minid, unread_from
from batch.input import Reading
from batch.lines import (
    LineRefused,
    bounded_lines,
    check_batch,
    is_output,
    parse_line,
    response_line,
    scan,
    unanswered_line,
)
from batch.policy import Capacity, lines_to_add, retryable
from batch.role import cron_fields, tick_of
from serving.usage import next_id, rows_of, tally
from shared.batches import FINAL, MOVES, sources
from shared.messages import UsageEvent

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def line(
    custom_id: str = "a", url: str = "/v1/chat/completions", body: object = None, **extra: object
) -> bytes:
    data = {"custom_id": custom_id, "method": "POST", "url": url, "body": CHAT if body is None else body}
    return json.dumps({**data, **extra}).encode()


@pytest.mark.parametrize(
    ("raw", "code", "param", "says"),
    [
        (b"{not json", "invalid_json", None, "not valid JSON"),
        (b"[1, 2]", "invalid_json", None, "not a JSON object"),
        (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}).encode(), "invalid_request",
         "custom_id", "missing 'custom_id'"),
        (line(method="GET"), "invalid_request", "method", "invalid 'method'"),
        (line(url="/v1/embeddings"), "invalid_url", "url", "/v1/chat/completions or /v1/completions"),
        (line(body={**CHAT, "temperature": 9}), "invalid_body", "body.temperature", "body.temperature"),
        (line(body={**CHAT, "bogus": 1}), "invalid_body", "body.bogus", "unrecognized argument 'body.bogus'"),
        (line(body={"model": "m"}), "invalid_body", "body.messages", "missing 'body.messages'"),
        (line(body={**CHAT, "stream": True}), "invalid_body", "body.stream", "stream is not supported"),
        (line(body={**CHAT, "n": 9}), "invalid_body", "body.n", "n must be at most 8"),
        (line(extra_field=1), "invalid_request", "extra_field", "unrecognized argument 'extra_field'"),
        (line(url="/v1/completions", body={"model": "m", "prompt": ["a", "b"]}), "invalid_body", "body",
         "one prompt"),
        # Nested deeper than the JSON parser recurses: refused like any other bad JSON, never a 500.
        (b'{"custom_id": "a", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json", None,
         "nested too deeply"),
    ],
)  # fmt: skip
def test_a_bad_line_is_refused_naming_it(raw: bytes, code: str, param: str | None, says: str) -> None:
    with pytest.raises(LineRefused) as refused:
        parse_line(7, raw, max_n=8)
    error = refused.value.error
    assert (error.code, error.line, error.param) == (code, 7, param)
    assert error.message.startswith("line 7: ") and says in error.message


def test_good_lines_parse_for_both_endpoints() -> None:
    chat = parse_line(1, line("x"), max_n=8)
    text = parse_line(2, line("y", "/v1/completions", {"model": "m", "prompt": "hi"}), max_n=8)
    assert (chat.custom_id, chat.url, chat.model) == ("x", "/v1/chat/completions", "m")
    assert (text.number, text.url, text.body.model) == (2, "/v1/completions", "m")


def test_a_scan_finds_every_problem_and_counts_requests() -> None:
    lines = [line("a"), b"\n", line("b"), line("a"), b"oops", line("c")]
    found = scan(lines, max_n=8, max_lines=100, keep=True)
    assert found.count == 5  # the blank line is no request
    assert [(e.line, e.code) for e in found.errors] == [(4, "duplicate_custom_id"), (5, "invalid_json")]
    assert [x.custom_id for x in found.lines] == ["a", "b", "c"]
    assert "line 4: custom_id 'a' appears more than once" in found.summary()


@pytest.mark.parametrize(
    ("lines", "max_lines", "codes"),
    [
        ([], 10, ["empty_file"]),
        ([b"  ", b""], 10, ["empty_file"]),
        ([line(str(i)) for i in range(4)], 3, ["too_many_lines"]),
        ([line(str(i)) for i in range(3)], 3, []),
    ],
)
def test_a_file_has_between_one_and_max_lines_requests(
    lines: list[bytes], max_lines: int, codes: list[str]
) -> None:
    assert [e.code for e in scan(lines, max_n=8, max_lines=max_lines).errors] == codes


def test_a_line_longer_than_a_request_body_may_be_is_refused() -> None:
    """A line becomes one request: it may not be larger than the gateway takes over HTTP."""
    short, long = line("a"), line("b", body={**CHAT, "user": "x" * 400})
    found = scan([short, long, line("c")], max_n=8, max_lines=10, max_line_bytes=len(long) - 1)
    assert [(e.line, e.code) for e in found.errors] == [(2, "line_too_long")]
    assert found.errors[0].message.startswith("line 2: ") and str(len(long) - 1) in found.errors[0].message
    assert found.count == 3


def test_lines_are_read_with_a_bound_however_long_they_are() -> None:
    """The upload's reader never holds more than the bound (plus one byte) of a line in memory."""
    source = io.BytesIO(b"short\n" + b"x" * 10_000 + b"\n" + b"tail-without-newline")
    read = list(bounded_lines(source, limit=100))
    assert read[0] == b"short\n" and len(read[1]) == 101 and read[2] == b"tail-without-newline"
    assert len(read) == 3


def test_without_keep_a_scan_holds_no_lines() -> None:
    assert scan([line("a"), line("b")], max_n=8, max_lines=10).lines == []


def test_a_batch_serves_one_existing_model_on_its_endpoint() -> None:
    def parsed(*raws: bytes) -> list:
        return [parse_line(i, raw, 8) for i, raw in enumerate(raws, 1)]

    good = parsed(line("a"), line("b"))
    assert check_batch(good, "/v1/chat/completions", {"m"}) == []
    other_model = {**CHAT, "model": "n"}
    lines = parsed(
        line("a"), line("b", "/v1/completions", {"model": "m", "prompt": "x"}), line("c", body=other_model)
    )
    errors = check_batch(lines, "/v1/chat/completions", {"m", "n"})
    assert [(e.line, e.code) for e in errors] == [(2, "mismatched_endpoint"), (3, "mismatched_model")]
    missing = check_batch(parsed(line("a")), "/v1/chat/completions", {"other"})
    assert [(e.code, e.param) for e in missing] == [("model_not_found", "body.model")]


def test_result_lines_have_openai_shape() -> None:
    ok = response_line("c1", "req_1", 200, {"id": "chatcmpl-1"})
    assert ok["custom_id"] == "c1" and ok["id"].startswith("batch_req_") and ok["error"] is None
    assert ok["response"] == {"status_code": 200, "request_id": "req_1", "body": {"id": "chatcmpl-1"}}
    refused = response_line("c2", "req_2", 400, InvalidRequest("bad").envelope())
    gone = unanswered_line("c3", "batch_expired", "too late")
    assert gone["response"] is None and gone["error"] == {"code": "batch_expired", "message": "too late"}
    assert [is_output(json.dumps(x)) for x in (ok, refused, gone)] == [True, False, False]


@pytest.mark.parametrize(
    ("in_flight", "window", "free", "waiting", "running", "add"),
    [
        # nothing interactive: fill the idle slots
        (0, 64, 10, (0, 0), (0, 0), 10),
        (0, 4, 10, (0, 0), (0, 0), 4),  # never beyond the window
        (60, 64, 10, (0, 0), (0, 0), 4),
        (64, 64, 10, (0, 0), (0, 0), 0),
        (0, 64, 0, (0, 0), (0, 0), 1),  # no free slot: keep one line waiting for the next one
        (3, 64, 0, (0, 1), (0, 0), 0),  # ... but only one
        (0, 64, 10, (0, 4), (0, 0), 6),  # lines of other batches already wait for those slots
        # interactive jobs waiting for a worker: only a batch with nothing in flight gets one
        (0, 64, 10, (2, 0), (0, 0), 1),
        (1, 64, 10, (2, 0), (8, 1), 0),
        # interactive jobs running: batches together get one line per four of them
        (0, 64, 100, (0, 0), (8, 0), 2),
        (1, 64, 100, (0, 0), (8, 1), 1),
        (2, 64, 100, (0, 0), (8, 2), 0),
        (0, 64, 100, (0, 0), (2, 0), 1),  # at least one
        (1, 64, 100, (0, 0), (2, 1), 0),
        (0, 64, 100, (0, 0), (8, 3), 1),  # other batches took the share: still one for this one
        (0, 1, 100, (0, 0), (40, 0), 1),  # and never beyond the window
    ],
)
def test_pacing(
    in_flight: int, window: int, free: int, waiting: tuple[int, int], running: tuple[int, int], add: int
) -> None:
    capacity = Capacity(
        free_slots=free,
        interactive_waiting=waiting[0],
        batch_waiting=waiting[1],
        interactive_running=running[0],
        batch_running=running[1],
    )
    assert lines_to_add(in_flight, window, capacity) == add


@pytest.mark.parametrize(
    ("error", "again"),
    [
        (Unavailable("no worker", code="queue_timeout"), True),
        (Timeout("stalled", code="stalled"), True),
        (UpstreamFailure("lost", code="worker_lost"), True),
        (from_status(500, "job_failed", "every worker died on it"), False),
        (InvalidRequest("bad"), False),
        (from_status(400, "invalid_request", "engine refused it"), False),
        (APIError("defect"), False),
    ],
)
def test_which_failures_run_a_line_again(error: APIError, again: bool) -> None:
    assert retryable(error) is again


def test_status_moves_are_openais() -> None:
    assert sources("cancelling") == ("in_progress", "validating")
    assert sources("cancelled") == ("cancelling",)
    assert sources("completed") == ("finalizing",)
    assert sources("expired") == ("in_progress", "validating")
    assert not FINAL & set(MOVES)  # nothing leaves a final status


@pytest.mark.parametrize(
    ("period", "fields"),
    [
        (1, {"second": set(range(60))}),
        (5, {"second": {0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55}}),
        (60, {"minute": set(range(60)), "second": {0}}),
        (900, {"minute": {0, 15, 30, 45}, "second": {0}}),
        (3600, {"minute": {0}, "second": {0}}),
    ],
)
def test_cron_periods_align_to_the_clock(period: int, fields: dict[str, set[int]]) -> None:
    assert cron_fields(period) == fields


def test_a_cron_runs_tick_is_in_its_id() -> None:
    assert tick_of("switchyard:cron:expire:1764684000123") == "1764684000123"


@pytest.mark.parametrize(
    ("last_delivered", "oldest_pending", "unread"),
    [
        ("5-0", None, "5-1"),
        ("5-3", "2-0", "2-0"),
        ("5-3", "5-3", "5-3"),
        ("0-0", None, "0-1"),
    ],
)
def test_what_a_group_has_not_read(last_delivered: str, oldest_pending: str | None, unread: str) -> None:
    assert unread_from(last_delivered, oldest_pending) == unread


@pytest.mark.parametrize(
    ("first_kept", "unread", "minid"),
    [
        ("10-0", [], "10-0"),
        ("10-0", ["12-0"], "10-0"),  # the group read past the cut: trim to the bound
        ("10-0", ["12-0", "9-5"], "9-5"),  # one group has not: keep what it still needs
        ("100-0", ["99-0"], "99-0"),  # ids compare as numbers, not text
    ],
)
def test_trimming_keeps_what_a_group_has_not_read(first_kept: str, unread: list[str], minid: str) -> None:
    assert trim_minid(first_kept, unread) == minid


def test_usage_is_tallied_per_tenant_day_hour_and_model() -> None:
    hour = 1_764_684_000_000  # 2025-12-02 14:00 UTC
    events = [
        (f"{hour}-0", UsageEvent(tenant="a", model="m", prompt_tokens=3, completion_tokens=4)),
        (
            f"{hour + 1000}-0",
            UsageEvent(tenant="a", model="m", prompt_tokens=1, completion_tokens=0, error="stalled"),
        ),
        (f"{hour + 3_600_000}-0", UsageEvent(tenant="b", model="m", prompt_tokens=2, completion_tokens=2)),
    ]
    counts = tally(events)
    assert counts[("a", "2025-12-02")] == Counter(
        {"14|m|requests": 2, "14|m|errors": 1, "14|m|prompt_tokens": 4, "14|m|completion_tokens": 4}
    )
    assert counts[("b", "2025-12-02")]["15|m|requests"] == 1
    fields = {k.encode(): str(v).encode() for k, v in counts[("a", "2025-12-02")].items()}
    (row,) = rows_of("2025-12-02", fields, 0, 2**40)
    assert (row.start_time, row.model, row.requests, row.errors) == (hour // 1000, "m", 2, 1)
    assert rows_of("2025-12-02", fields, hour // 1000 + 1, 2**40) == []


def test_the_id_after() -> None:
    assert next_id("1764684000000-7") == "1764684000000-8"


@pytest.mark.parametrize("block", [1, 3, 7, 1000])
def test_lines_read_in_blocks_keep_their_numbers_and_offsets(block: int) -> None:
    data = b"a\n\nbb\r\n" + b"x" * 40 + b"\nccc"
    seen: list[tuple[int, int, bytes]] = []
    reading = Reading(max_line_bytes=10, take=lambda n, at, raw: seen.append((n, at, raw)))
    for start in range(0, len(data), block):
        reading.feed(data[start : start + block])
    reading.close()
    assert [(n, at) for n, at, _ in seen] == [(1, 0), (3, 3), (4, 7), (5, 48)]
    assert [raw for n, at, raw in seen if n != 4] == [b"a\n", b"bb\r\n", b"ccc"]
    too_long = next(raw for n, _, raw in seen if n == 4)
    assert len(too_long) == 11  # never more than the bound and one byte of it
    for n, at, raw in seen:
        if n != 4:
            assert data[at : at + len(raw)] == raw
