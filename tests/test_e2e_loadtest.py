"""The Locust sweep against the real system: one short level, a complete report, LLM metrics sampled."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from loadtest import sweep
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
    assert sweep.main(argv) == 0, (out / "switchyard" / "users-2.log").read_text()[-3000:]

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
