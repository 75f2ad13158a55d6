"""monitoring/ against the running code: every metric the dashboards and alerts query is exported,
the configs pass promtool, and a real Prometheus scrapes the system and evaluates the rules."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from control.monitoring import ALERT_RULES, GATEWAY_JOB, WORKER_JOB, Monitoring, Prometheus
from control.processes import free_port
from tests.conftest import System

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "switchyard.json"
DATASOURCE = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROMETHEUS_BUILTIN = {"up"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        reason = f"{binary} not installed (apt-get install prometheus)"
        if os.environ.get("SWITCHYARD_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{reason}, and SWITCHYARD_REQUIRE_PROMETHEUS=1")
        pytest.skip(reason)
    return path


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (or a Grafana ``label_values(...)`` query) reads."""
    expr = re.sub(r"label_values\(\s*([^,()]+)\s*,\s*\w+\s*\)", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = GROUPING.sub(" ", expr)
    return {name for name in IDENT.findall(expr) if name not in KEYWORDS}


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def referenced_names() -> set[str]:
    return {n for e in dashboard_queries() + alert_exprs() for n in promql_metric_names(e)}


def exported_names(exposition: str) -> set[str]:
    """Series names an exposition can produce: its samples, plus declared families by their type."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def test_promql_names_are_found_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (model, le) (rate(a:b_bucket{x=~"5..", y="c:d"}[5m]))) '
        "/ on (model) group_left sum without (tenant) (c_total offset 1h) > 2 and absent(e:f) "
        "or deriv(max by (model) (g)[10m:1m]) > 1e3"
    )
    assert promql_metric_names(expr) == {"a:b_bucket", "c_total", "e:f", "g"}
    assert promql_metric_names("label_values(switchyard:queue_depth, tenant)") == {"switchyard:queue_depth"}
    assert promql_metric_names('rate(x[$__rate_interval]) * on(instance) y{job=~"$job"}') == {"x", "y"}


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 12
    for panel in graphs:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]


def test_alert_rules_and_configs_pass_promtool() -> None:
    promtool = _require("promtool")
    checks = [
        ["check", "rules", str(ALERT_RULES)],
        ["check", "config", str(MONITORING / "prometheus.yml")],
        ["check", "config", str(MONITORING / "prometheus-compose.yml")],
    ]
    for args in checks:
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    rules = yaml.safe_load(ALERT_RULES.read_text())["groups"][0]["rules"]
    for rule in rules:
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


def _traffic(client: OpenAI, system: System) -> None:
    """A few requests of each kind, so labelled series and histograms have samples."""
    msgs: Any = [{"role": "user", "content": "Tell me about rail yards."}]
    client.chat.completions.create(model=system.model, messages=msgs, max_tokens=8)
    stream = client.chat.completions.create(model=system.model, messages=msgs, max_tokens=8, stream=True)
    assert sum(1 for _ in stream) > 0
    client.completions.create(model=system.model, prompt="switch", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=4)


@pytest.fixture(scope="module")
def scrapes(system: System, client: OpenAI) -> dict[str, str]:
    _traffic(client, system)
    return {
        GATEWAY_JOB: httpx.get(system.gateway_metrics_url, timeout=10).text,
        WORKER_JOB: httpx.get(system.worker_metrics_url, timeout=10).text,
    }


@pytest.mark.e2e
def test_every_queried_metric_is_exported(scrapes: dict[str, str]) -> None:
    exported = exported_names(scrapes[GATEWAY_JOB]) | exported_names(scrapes[WORKER_JOB])
    referenced = referenced_names()
    assert len(referenced) >= 20
    missing = sorted(referenced - exported - PROMETHEUS_BUILTIN)
    assert not missing, f"queried by monitoring/ but not exported: {missing}"


def _api(prom: Prometheus, path: str, **params: str) -> Any:
    body = httpx.get(f"{prom.url}/api/v1/{path}", params=params, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]


def _poll(check: Any, timeout: float, what: str, why: Any = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {why()}")
        time.sleep(0.5)


def _hostport(url: str) -> str:
    return httpx.URL(url).netloc.decode()


@pytest.fixture(scope="module")
def prometheus(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = _require("prometheus")
    prom = Prometheus(
        gateways=[_hostport(system.gateway_metrics_url)],
        workers=[_hostport(system.worker_metrics_url)],
        port=free_port(),
        interval=1.0,
        binary=binary,
    )
    prom.start(log=tmp_path_factory.mktemp("prometheus") / "prometheus.log")
    try:
        yield prom
    finally:
        prom.stop()


def test_monitoring_runs_prometheus_when_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _require("prometheus")
    monitoring = Monitoring(free_port())
    monitoring.check()
    monitoring.start("0.0.0.0", 9100, [9101, 9102])
    try:
        assert monitoring.server is not None
        assert monitoring.server.url in monitoring.describe()
        config = yaml.safe_load(
            httpx.get(f"{monitoring.server.url}/api/v1/status/config").json()["data"]["yaml"]
        )
        targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in config["scrape_configs"]}
        assert targets == {GATEWAY_JOB: ["127.0.0.1:9100"], WORKER_JOB: ["127.0.0.1:9101", "127.0.0.1:9102"]}
        assert len(_api(monitoring.server, "rules")["groups"][0]["rules"]) == len(alert_exprs())
    finally:
        monitoring.stop()
    assert monitoring.server.process is not None and monitoring.server.process.poll() is not None
    monkeypatch.setenv("PATH", "/nonexistent")
    missing = Monitoring(free_port())
    missing.check()
    missing.start("127.0.0.1", 9100, [9101])
    assert missing.server is None and missing.describe() == ""
    assert "apt-get install prometheus" in capsys.readouterr().out


def _has_data(prom: Prometheus, query: str) -> bool:
    return bool(_api(prom, "query", query=query)["result"])


KEY_SERIES = [
    "switchyard:requests_total",
    "switchyard:time_to_first_token_seconds_bucket",
    "switchyard:generation_tokens_total",
    "switchyard:queue_depth",
    "switchyard:live_workers",
    "switchyard:redis_up",
    "switchyard:worker_jobs_total",
    "vllm:kv_cache_usage_perc",
]


@pytest.mark.e2e
def test_prometheus_scrapes_the_system(prometheus: Prometheus, system: System, client: OpenAI) -> None:
    def targets_up() -> bool:
        active = _api(prometheus, "targets")["activeTargets"]
        return {t["labels"]["job"] for t in active if t["health"] == "up"} == {GATEWAY_JOB, WORKER_JOB}

    _poll(targets_up, 30, "both targets up")
    _traffic(client, system)
    # Colons must survive the scrape: Prometheus asks for OpenMetrics first, and an encoder that
    # escapes ':' would store `vllm_kv_cache_usage_perc` where every query looks for the colon name.
    mangled = 'count by (job, __name__) ({__name__=~"(switchyard|vllm)_.+"})'
    _poll(lambda: _has_data(prometheus, "switchyard:live_workers"), 30, "a gateway scrape")
    assert not _api(prometheus, "query", query=mangled)["result"], "metric names lost their colons"
    for query in KEY_SERIES:
        targets = lambda: _api(prometheus, "targets")["activeTargets"]  # noqa: E731
        _poll(lambda q=query: _has_data(prometheus, q), 30, f"data for {query}", why=targets)
    generated = _api(prometheus, "query", query="sum(switchyard:generation_tokens_total)")["result"]
    assert float(generated[0]["value"][1]) > 0
    # Every dashboard query must parse and evaluate on a real server.
    for expr in dashboard_queries():
        if expr.startswith("label_values("):
            continue
        concrete = expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$tenant", ".*")
        _api(prometheus, "query", query=concrete)


@pytest.mark.e2e
def test_alert_rules_load_and_stay_quiet_while_healthy(prometheus: Prometheus) -> None:
    def rules() -> dict[str, dict[str, Any]]:
        groups = _api(prometheus, "rules", type="alert")["groups"]
        return {r["name"]: r for g in groups for r in g["rules"]}

    loaded = rules()
    assert {"SwitchyardNoLiveWorkers", "SwitchyardRedisDown", "SwitchyardTargetDown"} <= loaded.keys()
    assert len(loaded) == len(alert_exprs())

    def quiet() -> bool:
        now = rules()
        return all(now[a]["state"] == "inactive" for a in ("SwitchyardNoLiveWorkers", "SwitchyardRedisDown"))

    # Before the first scrape `absent(switchyard:live_workers)` holds, so wait for fresh evaluations.
    _poll(lambda: _has_data(prometheus, "switchyard:live_workers"), 30, "live_workers scraped")
    _poll(quiet, 30, "no-live-worker and Redis-down alerts inactive")
    assert all(r["health"] == "ok" for r in rules().values()), rules()
