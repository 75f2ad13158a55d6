"""The Locust sweep against the real system: one short level, a complete report, LLM metrics sampled."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from loadtest import fairness, sweep
from loadtest.report import read_json, read_text
from loadtest.sweepreport import read_rows
from shared.tenants import Tenant
from tests.conftest import System, create_tenant

pytestmark = pytest.mark.e2e


def test_sweep_one_short_level(system: System, tmp_path: Path) -> None:
    out = tmp_path / "report"
    argv = ["--url", system.base_url, "--levels", "2", "--duration", "5", "--pause", "0", "--out", str(out)]
    keys = [
        asyncio.run(create_tenant(system.redis_url, system.names, Tenant(name=n))) for n in ("lt-a", "lt-b")
    ]
    argv += ["--output-tokens", "16", "--prompt-tokens", "32", "--api-keys", ",".join(keys)]
    argv += ["--stream-weight", "3", "--nonstream-weight", "1"]
    assert sweep.main(argv) == 0, read_text(out / "switchyard" / "users-2.log")[-3000:]

    for name in ("summary.md", "summary.json", "throughput.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {(r["Type"], r["Name"]): r for r in read_rows(out / "switchyard" / "users-2_stats.csv")}
    ttft = rows[("TTFT", "stream")]
    assert int(ttft["Request Count"]) > 0 and ttft["Failure Count"] == "0"
    assert rows[("POST", "/v1/chat/completions")]["Failure Count"] == "0"

    doc = json.loads((out / "summary.json").read_text())
    (level,) = doc["targets"]["switchyard"]
    assert level["users"] == 2 and level["requests"] > 0 and level["failures"] == 0
    assert level["ttft_samples"] > 0 and level["ttft_p50_ms"] is not None
    assert level["output_tokens_per_s"] > 0
    assert level["window_s"] > 0 and level["client_cpu_s"] > 0
    assert doc["meta"]["targets"][0]["model"] == system.model
    assert "| 2 |" in (out / "summary.md").read_text()


def test_fairness_short_run_against_a_running_system(system: System, tmp_path: Path) -> None:
    key_a, key_b = (
        asyncio.run(create_tenant(system.redis_url, system.names, Tenant(name=n)))
        for n in ("fair-a", "fair-b")
    )
    out = tmp_path / "fairness.json"
    argv = ["--base-url", f"{system.base_url}/v1", "--key-a", key_a, "--key-b", key_b, "--out", str(out)]
    argv += ["--redis-url", system.redis_url, "--key-prefix", system.names.prefix]
    argv += ["--metrics-url", system.gateway_metrics_url]
    argv += ["--concurrency", "1", "--flood-concurrency", "4", "--duration", "2", "--lead", "1"]
    argv += ["--warmup", "1", "--prompt-tokens", "16", "--output-tokens", "8"]
    assert fairness.main(argv) == 0

    doc = read_json(out)
    for part in ("alone", "victim", "flooder"):
        assert doc[part]["requests_ok"] > 0 and doc[part]["errors"] == 0, part
        assert doc[part]["token_mismatches"] == 0 and doc[part]["ttft_p95_ms"] > 0, part
    assert doc["options"]["flood_concurrency"] == 4 and "key_a" not in doc["options"]
    assert doc["queue_flood"]["samples"] > 0  # Redis was read while B was measured
    assert doc["gateway_alone"]["ttft_mean_ms"] > 0  # and the gateway's /metrics, on its own port
    assert doc["worker_capacity"] >= 1 and doc["flood_tokens_per_s"] > 0
    assert doc["cpu_flood"]["flood client"] > 0  # A's streams came from a client process of their own
