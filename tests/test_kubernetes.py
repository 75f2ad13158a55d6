"""deploy/kubernetes, checked offline (no cluster here): Kubernetes' own schemas (strict, a current
version), KEDA's ScaledObject schema, and that the manifests agree with the code: settings named
exist, commands are the CLI's, ports and probe paths are what the processes serve, grace periods
outlast the drains, and KEDA asks the gateways about the model the workers serve."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from control.processes import free_port
from gateway.app import create_app, scaling_row
from scaling.decision import Decision, Load, Memory
from shared.settings import BackgroundSettings, GatewaySettings, WorkerSettings
from worker.health import Health
from worker.metrics import MetricsServer

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.37.0"
"""The newest Kubernetes whose schemas kubernetes-validate bundles."""


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def container(deployment: str) -> dict[str, Any]:
    spec = find("Deployment", deployment)["spec"]["template"]["spec"]
    (only,) = spec["containers"]
    return dict(only)


CONFIG = find("ConfigMap", "switchyard-config")["data"]


def test_the_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


@pytest.mark.parametrize(
    "doc",
    [d for d in documents() if d["apiVersion"] != "keda.sh/v1alpha1"],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_core_kinds_are_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def closed(schema: Any) -> Any:
    """A JSON schema in which objects with named properties allow no others (strict, like kubectl's
    field validation; maps of free keys, such as trigger metadata, stay open)."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def test_the_scaled_object_matches_kedas_schema() -> None:
    # KEDA's ScaledObject CRD as a package publishes it (cloudcoil-models-keda, generated from the
    # CRD of the KEDA release its version names, pinned in pyproject.toml).
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    scaled = find("ScaledObject", "switchyard-worker")
    jsonschema.validate(scaled, closed(ScaledObject.model_json_schema()))
    ScaledObject.model_validate(scaled)
    broken = {**scaled, "spec": {**scaled["spec"], "minReplicas": 0}}  # a field KEDA does not have
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, closed(ScaledObject.model_json_schema()))


def test_keda_asks_the_gateways_about_the_served_model() -> None:
    scaled = find("ScaledObject", "switchyard-worker")
    assert (
        scaled["spec"]["scaleTargetRef"]["name"]
        == find("Deployment", "switchyard-worker")["metadata"]["name"]
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "metrics-api"
    url = urlparse(trigger["metadata"]["url"])
    service = find("Service", "switchyard-gateway")
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    assert url.path == "/scaling" and "/scaling" in {r.path for r in create_app(GatewaySettings()).routes}  # type: ignore[attr-defined]
    assert parse_qs(url.query)["model"] == [CONFIG["SWITCHYARD_SERVED_MODEL_NAME"]]
    row = scaling_row(Load(0, 0, 0, 8), Decision(0, "steady", Memory()))
    assert trigger["metadata"]["valueLocation"] in row
    # Scaling to zero needs gateways that keep the model servable with no worker.
    assert scaled["spec"]["minReplicaCount"] == 0
    assert GatewaySettings(scale_from_zero=CONFIG["SWITCHYARD_SCALE_FROM_ZERO"]).scale_from_zero


def test_every_setting_named_is_one_the_code_reads() -> None:
    settings = (GatewaySettings, BackgroundSettings, WorkerSettings)
    known = {f"SWITCHYARD_{n.upper()}" for s in settings for n in s.model_fields}
    assert set(CONFIG) <= known, set(CONFIG) - known
    GatewaySettings(
        **{
            k.removeprefix("SWITCHYARD_").lower(): v
            for k, v in CONFIG.items()
            if k.removeprefix("SWITCHYARD_").lower() in GatewaySettings.model_fields
        }
    )
    WorkerSettings(
        **{
            k.removeprefix("SWITCHYARD_").lower(): v
            for k, v in CONFIG.items()
            if k.removeprefix("SWITCHYARD_").lower() in WorkerSettings.model_fields
        }
    )
    for name in ("switchyard-gateway", "switchyard-worker", "switchyard-background"):
        env = {e["name"] for e in container(name).get("env", [])}
        assert "REDIS_URL" in env, f"{name} would look for Redis on its own localhost"
    # Gateways store uploads, background pods read them: without a shared volume they meet in Redis.
    assert CONFIG["SWITCHYARD_FILE_STORE"] == "redis"


def test_commands_are_cli_commands() -> None:
    for name in ("switchyard-gateway", "switchyard-worker", "switchyard-background"):
        args = container(name)["args"]
        assert args[0] == "switchyard"
        done = subprocess.run(
            [sys.executable, "-m", "control.cli", *args[1:], "--help"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, f"{name}: {done.stderr[-500:]}"


def test_ports_and_probes_are_what_the_gateway_serves() -> None:
    gateway = container("switchyard-gateway")
    args = gateway["args"]
    assert gateway["ports"][0]["containerPort"] == int(args[args.index("--port") + 1])
    paths = {r.path for r in create_app(GatewaySettings()).routes}  # type: ignore[attr-defined]
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["path"] in paths
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pod = find("Deployment", "switchyard-gateway")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(gateway["ports"][0]["containerPort"])


def test_ports_and_probes_are_what_the_worker_serves() -> None:
    worker = container("switchyard-worker")
    port = int(CONFIG["SWITCHYARD_METRICS_PORT"])
    assert worker["ports"][0]["containerPort"] == port
    pod = find("Deployment", "switchyard-worker")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    health = Health(stale_after=30)
    server = MetricsServer(free_port(), health, host="127.0.0.1")
    try:

        def status(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        probes = {
            p: worker[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        assert status(probes["readinessProbe"]) == 503  # loading
        assert status(probes["livenessProbe"]) == 200
        health.serving = True
        assert status(probes["readinessProbe"]) == 200
        health.draining = True
        assert status(probes["readinessProbe"]) == 503
        assert status("/metrics") == 200 and status("/nothing-here") == 404
    finally:
        server.close()


def test_grace_periods_outlast_the_drains() -> None:
    gateway = find("Deployment", "switchyard-gateway")["spec"]["template"]["spec"]
    pause = container("switchyard-gateway")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert gateway["terminationGracePeriodSeconds"] > float(CONFIG["SWITCHYARD_SHUTDOWN_GRACE"]) + pause
    worker = find("Deployment", "switchyard-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] > float(CONFIG["SWITCHYARD_DRAIN_TIMEOUT"])
    background = find("Deployment", "switchyard-background")["spec"]["template"]["spec"]
    assert background["terminationGracePeriodSeconds"] > BackgroundSettings().background_drain_timeout
    budget = find("PodDisruptionBudget", "switchyard-gateway")
    assert budget["spec"]["selector"] == find("Deployment", "switchyard-gateway")["spec"]["selector"]


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = find("StatefulSet", "switchyard-redis")
    (server,) = redis["spec"]["template"]["spec"]["containers"]
    assert server["args"][server["args"].index("--appendonly") + 1] == "yes"
    assert server["volumeMounts"][0]["mountPath"] == "/data"
    secret = find("Secret", "switchyard-redis")["stringData"]["url"]
    assert urlparse(secret).hostname == find("Service", "switchyard-redis")["metadata"]["name"]
