"""The sweep report from Locust's CSV rows: the summary table, the JSON and the charts."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import pytest

from loadtest import sweepreport as sr
from loadtest.pathcost import Level, split
from loadtest.sweepreport import write_charts
from loadtest.workload import Workload, base_url, parse_keys

HEADER = [
    "Type",
    "Name",
    "Request Count",
    "Failure Count",
    "Median Response Time",
    "Average Response Time",
    "Min Response Time",
    "Max Response Time",
    "Average Content Size",
    "Requests/s",
    "Failures/s",
    "50%",
    "66%",
    "75%",
    "80%",
    "90%",
    "95%",
    "98%",
    "99%",
    "99.9%",
    "99.99%",
    "100%",
]


def row(kind: str, name: str, count: int, fails: int, avg: float, size: float, rps: float, p50: str,
        p95: str, p99: str) -> dict[str, str]:  # fmt: skip
    cells = [kind, name, str(count), str(fails), p50, str(avg), "1", "999", str(size), str(rps), "0"]
    cells += [p50, p50, p50, p50, p95, p95, p99, p99, p99, p99, p99]
    return dict(zip(HEADER, cells, strict=True))


def level_rows(rps: float, ttft_p50: str, failures: int = 0) -> list[dict[str, str]]:
    """What one Locust run of the locustfile writes: requests, TTFT, TPOT, two TOKENS/S rows."""
    return [
        row("POST", "/v1/chat/completions", 100, failures, 900.0, 5000, rps, "800", "1500", "2000"),
        row("TOKENS/S", "non-stream", 20, 0, 140.0, 128, rps / 5, "140", "150", "160"),
        row("TOKENS/S", "stream", 80 - failures, 0, 150.0, 128, rps * 4 / 5, "150", "160", "170"),
        row("TPOT", "stream", 80 - failures, 0, 6.25, 0, rps * 4 / 5, "6", "7", "8"),
        row("TTFT", "stream", 80 - failures, 0, 120.0, 0, rps * 4 / 5, ttft_p50, "300", "400"),
        row("", "Aggregated", 360, failures, 300.0, 1000, rps * 3.6, "150", "900", "1500"),
    ]


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_level_figures_come_from_the_right_rows(tmp_path: Path) -> None:
    rows = sr.read_rows(
        write_csv(tmp_path / "users-8_stats.csv", level_rows(rps=10.0, ttft_p50="110", failures=4))
    )
    lv = sr.level_from_rows(8, rows)
    assert (lv.users, lv.requests, lv.failures) == (8, 100, 4)
    assert lv.error_rate == pytest.approx(0.04)
    assert lv.rps == pytest.approx(10.0 * 96 / 100)  # successful requests only
    assert (lv.latency_p50_ms, lv.latency_p95_ms, lv.latency_p99_ms) == (800.0, 1500.0, 2000.0)
    assert (lv.ttft_p50_ms, lv.ttft_p95_ms, lv.ttft_samples) == (110.0, 300.0, 76)
    assert lv.tpot_mean_ms == pytest.approx(6.25)
    # both TOKENS/S rows: requests/s x mean output tokens per request
    assert lv.output_tokens_per_s == pytest.approx(10.0 / 5 * 128 + 10.0 * 4 / 5 * 128)


def test_missing_rows_give_empty_figures_not_errors() -> None:
    lv = sr.level_from_rows(1, [row("POST", "/v1/chat/completions", 3, 3, 0, 0, 0.5, "N/A", "N/A", "N/A")])
    assert lv.error_rate == 1.0 and lv.rps == 0.0
    assert lv.latency_p50_ms is None and lv.ttft_p50_ms is None and lv.tpot_mean_ms is None
    assert lv.output_tokens_per_s == 0.0


def sweep(tmp_path: Path) -> sr.SweepReport:
    report = sr.SweepReport(meta={"label": "unit", "started": "2026-01-01T00:00:00+00:00"})
    for name, factor in (("switchyard", 1.0), ("vllm", 0.8)):
        levels = []
        for users in (1, 8, 64):
            lv = sr.level_from_rows(users, level_rows(rps=users * factor, ttft_p50=str(100 + users)))
            lv.client_cpu_pct, lv.host_busy_cores, lv.loadavg_before = 12.0, 1.5, "1.00 0.50 0.25"
            levels.append(lv)
        report.targets[name] = levels
    return report


def test_summary_table_has_one_row_per_level_and_ratio_columns(tmp_path: Path) -> None:
    md = sr.render_markdown(sweep(tmp_path))
    lines = md.splitlines()
    sy = lines.index("## switchyard")
    table = lines[sy + 2 : sy + 2 + 5]
    assert table[0].startswith("| users | requests | req/s | latency p50 (ms)")
    assert table[2].startswith(
        "| 1 | 100 | 1.00 | 800 | 1500 | 2000 | 101 | 300 | 6.25 | 128.0 | 0.00% | 12 |"
    )
    assert table[4].startswith("| 64 | 100 | 64.00 |")
    ratios = lines[lines.index("## switchyard / vllm") + 2 :]
    assert ratios[0] == "| users | output tok/s | req/s | latency p50 | latency p95 | TTFT p50 | TTFT p95 |"
    assert ratios[2] == "| 1 | 1.250 | 1.250 | 1.000 | 1.000 | 1.000 | 1.000 |"
    assert "| vllm | 64 | 1.00 0.50 0.25 |" in md  # host load recorded per level


def test_json_is_strict_and_holds_levels_and_ratios(tmp_path: Path) -> None:
    doc = json.loads(sr.to_json(sweep(tmp_path)))
    assert doc["meta"]["label"] == "unit"
    assert [lv["users"] for lv in doc["targets"]["vllm"]] == [1, 8, 64]
    assert doc["targets"]["switchyard"][2]["output_tokens_per_s"] == pytest.approx(64 * 128)
    assert doc["ratios"]["of"] == ["switchyard", "vllm"]
    assert doc["ratios"]["levels"][2]["output_tokens_per_s"] == pytest.approx(1.25)
    single = sr.SweepReport(meta={}, targets={"only": [sr.LevelResult(users=1)]})
    assert "ratios" not in json.loads(sr.to_json(single))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_charts_are_valid_pngs(tmp_path: Path) -> None:
    paths = write_charts(sweep(tmp_path), tmp_path)
    assert sorted(p.name for p in paths) == ["latency.png", "throughput.png"]
    for path in paths:
        width, height = png_size(path)
        assert width >= 600 and height >= 300


def test_workload_helpers() -> None:
    assert parse_keys(" a, b,,c ") == ("a", "b", "c")
    assert base_url("http://h:1/v1/") == base_url("http://h:1") == "http://h:1"
    body = json.loads(Workload("m", 5, 7, seed=1).body("k", stream=True))
    assert (body["max_tokens"], body["ignore_eos"], body["stream"]) == (7, True, True)
    assert len(body["messages"][0]["content"].split()) == 5
    assert body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in json.loads(Workload("m", 5, 7).body("k", stream=False))


def test_reported_command_masks_api_keys() -> None:
    from loadtest.sweep import redact

    assert redact(["--url", "u", "--api-keys", "k1,k2", "--api-keys=k3"]) == [
        "--url", "u", "--api-keys", "***", "--api-keys=***",
    ]  # fmt: skip


def test_pathcost_split_recovers_per_request_and_per_event_cost() -> None:
    def level(tokens: int, requests: int, events: float) -> Level:
        cpu = {"gateway": requests * 0.002 + events * 0.00005, "redis": requests * 0.0001}
        return Level("s", 64, output_tokens=tokens, requests=requests, events=events, cpu_s=cpu)

    fits = {f.part: f for f in split([level(16, 520, 2080.0), level(128, 520, 13520.0), level(8, 99, 99.0)])}
    assert fits["gateway"].ms_per_request == pytest.approx(2.0)
    assert fits["gateway"].ms_per_event == pytest.approx(0.05)
    assert fits["redis"].ms_per_event == pytest.approx(0.0, abs=1e-9)
    assert fits["gateway"].worst_residual < 1e-6
    assert split([level(128, 520, 13520.0)]) == []  # one answer length: nothing to split
