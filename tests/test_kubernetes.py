"""deploy/kubernetes, checked offline (no cluster here): Kubernetes' own schemas (strict, a current
version), KEDA's ScaledObject schema, and that the manifests agree with the code: settings named
exist, commands are the CLI's, ports and probe paths are what the processes serve, grace periods
outlast the drains, and KEDA asks the gateways about the model the workers serve."""

from __future__ import annotations

import base64
import re
import shutil
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
from gateway.app import create_app
from gateway.internal import scaling_row
from scaling.decision import Decision, Load, Memory
from shared.settings import BackgroundSettings, GatewaySettings, RedisSettings, WorkerSettings
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


def redis_container() -> dict[str, Any]:
    (only,) = find("StatefulSet", "switchyard-redis")["spec"]["template"]["spec"]["containers"]
    return dict(only)


def pod_templates() -> dict[str, dict[str, Any]]:
    """Every workload's pod template, by workload name."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for d in documents()
        if d["kind"] in ("Deployment", "StatefulSet")
    }


SWITCHYARD_DEPLOYMENTS = ("switchyard-gateway", "switchyard-worker", "switchyard-background")


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
    # /scaling is served on the gateways' metrics port, and the Service leads there.
    ports = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    named = {p["name"]: p["containerPort"] for p in container("switchyard-gateway")["ports"]}
    assert named[ports[url.port]] == int(CONFIG["SWITCHYARD_METRICS_PORT"])
    app = create_app(GatewaySettings())
    assert url.path == "/scaling" and "/scaling" in {r.path for r in app.state.internal.routes}
    assert "/scaling" not in {r.path for r in app.routes}  # type: ignore[attr-defined]
    assert parse_qs(url.query)["model"] == [CONFIG["SWITCHYARD_SERVED_MODEL_NAME"]]
    row = scaling_row(Load(0, 0, 0, 8), Decision(0, "steady", Memory()))
    assert trigger["metadata"]["valueLocation"] in row
    # Scaling to zero needs gateways that keep the model servable with no worker.
    assert scaled["spec"]["minReplicaCount"] == 0
    assert GatewaySettings(scale_from_zero=CONFIG["SWITCHYARD_SCALE_FROM_ZERO"]).scale_from_zero


def settings_of(cls: type[RedisSettings]) -> Any:
    """``cls`` as a pod that reads the ConfigMap builds it."""
    fields = {"REDIS_URL" if n == "redis_url" else f"SWITCHYARD_{n.upper()}": n for n in cls.model_fields}
    return cls(**{fields[k]: v for k, v in CONFIG.items() if k in fields})


def test_every_setting_named_is_one_the_code_reads() -> None:
    settings = (GatewaySettings, BackgroundSettings, WorkerSettings)
    known = {f"SWITCHYARD_{n.upper()}" for s in settings for n in s.model_fields} | {"REDIS_URL"}
    assert set(CONFIG) <= known, set(CONFIG) - known
    for cls in settings:
        settings_of(cls)
    for name in SWITCHYARD_DEPLOYMENTS:
        pod = find("Deployment", name)["spec"]["template"]["spec"]
        assert pod["containers"][0]["envFrom"] == [{"configMapRef": {"name": "switchyard-config"}}], name
    assert "REDIS_URL" in CONFIG, "every pod would look for Redis on its own localhost"


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
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["http"] == int(args[args.index("--port") + 1])
    app = create_app(GatewaySettings())
    paths = {r.path for r in app.routes}  # type: ignore[attr-defined]
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["path"] in paths
        assert gateway[probe]["httpGet"]["port"] == "http"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Prometheus scrapes the metrics port: the API's serves no /metrics.
    pod = find("Deployment", "switchyard-gateway")["spec"]["template"]
    assert ports["metrics"] == int(CONFIG["SWITCHYARD_METRICS_PORT"]) != ports["http"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert "/metrics" not in paths and "/metrics" in {r.path for r in app.state.internal.routes}


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
    server = redis_container()
    assert server["args"][server["args"].index("--appendonly") + 1] == "yes"
    assert server["volumeMounts"][0]["mountPath"] == "/data"
    url = urlparse(CONFIG["REDIS_URL"])
    assert url.hostname == find("Service", "switchyard-redis")["metadata"]["name"]
    assert url.password is None, "the password is the Secret's, never in the ConfigMap"


# -- hardening ------------------------------------------------------------------------------------

QUANTITY = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def quantity(text: str) -> int:
    """A Kubernetes quantity of bytes (``4Gi``, ``512M``) as a number."""
    found = re.fullmatch(r"(\d+)([kMGT]i?)?", text)
    assert found is not None, text
    return int(found[1]) * QUANTITY[found[2] or ""]


def option_of(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def image_user() -> tuple[int, str]:
    """The Dockerfile's user id and its HOME."""
    text = (ROOT / "Dockerfile").read_text()
    user, home = re.search(r"^USER (\d+):\d+$", text, re.MULTILINE), re.search(r"\bHOME=(\S+)", text)
    assert user is not None and home is not None
    return int(user[1]), home[1]


def test_every_container_runs_unprivileged_with_bounded_memory() -> None:
    uid, home = image_user()
    for name, pod in pod_templates().items():
        spec = pod["spec"]
        context = spec["securityContext"]
        assert context["runAsUser"] != 0 and "fsGroup" in context, name  # volumes writable for it
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in [*spec["containers"], *spec.get("initContainers", [])]:
            assert c["securityContext"] == {
                "runAsNonRoot": True,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }, (name, c["name"])
            resources = c["resources"]
            request, limit = resources["requests"]["memory"], resources["limits"]["memory"]
            assert quantity(limit) >= quantity(request), (name, c["name"])
            if c["image"].startswith("switchyard:"):
                assert context["runAsUser"] == uid, name  # the image's user, owner of its directories
                # What the read-only root leaves writable: volumes, and /tmp (HOME too) for caches.
                mounted = {m["mountPath"] for m in c["volumeMounts"]}
                assert {"/tmp", home, "/var/cache/switchyard"} <= mounted, (name, mounted)


def policies() -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == "NetworkPolicy"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) picks these labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def ingress(workload: str) -> list[dict[str, Any]]:
    """The ingress rules of the one policy that selects the workload's pods."""
    labels = pod_templates()[workload]["metadata"]["labels"]
    (policy,) = [p for p in policies() if selects(p["spec"]["podSelector"], labels)]
    assert policy["spec"]["policyTypes"] == ["Ingress"], workload
    rules: list[dict[str, Any]] = policy["spec"]["ingress"]
    return rules


def namespaces(rule: dict[str, Any]) -> set[str]:
    found = set()
    for peer in rule["from"]:
        assert set(peer) == {"namespaceSelector"}, peer  # whole namespaces, nothing broader
        found.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    return found


def test_network_policies_let_in_only_who_needs_each_port() -> None:
    # Every pod is selected by a policy: what no rule admits is refused.
    for name in pod_templates():
        ingress(name)
    # Redis: from Switchyard's own pods only, on its port.
    (rule,) = ingress("switchyard-redis")
    (peer,) = rule["from"]
    allowed = {
        n for n, pod in pod_templates().items() if selects(peer["podSelector"], pod["metadata"]["labels"])
    }
    assert allowed == set(SWITCHYARD_DEPLOYMENTS)
    (expression,) = peer["podSelector"]["matchExpressions"]  # and nobody else, now or later
    assert sorted(expression["values"]) == sorted(SWITCHYARD_DEPLOYMENTS)
    assert [p["port"] for p in rule["ports"]] == [p["name"] for p in redis_container()["ports"]]
    # Gateways: the API from anywhere; the metrics port (/metrics, /scaling) from monitoring and KEDA.
    api, metrics = ingress("switchyard-gateway")
    assert "from" not in api and [p["port"] for p in api["ports"]] == ["http"]
    assert namespaces(metrics) == {"monitoring", "keda"} and [p["port"] for p in metrics["ports"]] == [
        "metrics"
    ]
    # Workers: their metrics port from monitoring only. Background pods: nothing at all.
    (rule,) = ingress("switchyard-worker")
    assert namespaces(rule) == {"monitoring"} and [p["port"] for p in rule["ports"]] == ["metrics"]
    assert ingress("switchyard-background") == []
    for name in ("switchyard-gateway", "switchyard-worker"):
        ports = {p["name"]: p["containerPort"] for p in container(name)["ports"]}
        assert ports["metrics"] == int(CONFIG["SWITCHYARD_METRICS_PORT"]), name


def test_files_live_on_a_volume_gateways_and_background_pods_share() -> None:
    settings = settings_of(BackgroundSettings)
    assert settings.file_store == "directory" and settings.files_dir is not None
    claim = find("PersistentVolumeClaim", "switchyard-files")["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"]
    assert settings.files_max_total_bytes < quantity(claim["resources"]["requests"]["storage"])
    for name in ("switchyard-gateway", "switchyard-background"):
        spec = find("Deployment", name)["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == "switchyard-files", name
        mounts = {m["name"]: m["mountPath"] for m in container(name)["volumeMounts"]}
        assert mounts[volume["name"]] == str(settings.files_dir), name


def test_redis_memory_holds_every_byte_quota_with_room_to_spare() -> None:
    """As for Compose (tests/test_compose.py): Redis never evicts, so each model's jobs and dead
    letters must fit in three quarters of maxmemory; the container's limit is above maxmemory."""
    from tests.test_compose import CONTEXT_TOKENS, TOKEN_ID_BYTES, redis_bytes

    server = redis_container()
    assert option_of(server["args"], "--maxmemory-policy") == "noeviction"
    maxmemory = redis_bytes(option_of(server["args"], "--maxmemory"))
    assert quantity(server["resources"]["limits"]["memory"]) > maxmemory
    settings = settings_of(BackgroundSettings)
    job = settings.max_body_bytes + TOKEN_ID_BYTES * CONTEXT_TOKENS
    assert (settings.max_backlog_total + settings.dead_letter_max) * job <= 0.75 * maxmemory


def secret_ref(c: dict[str, Any], variable: str) -> dict[str, str]:
    (found,) = [e for e in c["env"] if e["name"] == variable]
    ref: dict[str, str] = found["valueFrom"]["secretKeyRef"]
    return ref


def test_redis_wants_the_secrets_password_and_every_pod_sends_it() -> None:
    password = {"name": "switchyard-redis", "key": "password"}
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    (generated,) = kustomization["secretGenerator"]
    assert generated["name"] == "switchyard-redis" and generated["envs"] == ["redis.env"]
    # The same name after a new password: pods take it when restarted, not all at once.
    assert generated["options"] == {"disableNameSuffixHash": True}
    assert "deploy/kubernetes/redis.env" in (ROOT / ".gitignore").read_text().splitlines()
    assert not [d for d in documents() if d["kind"] == "Secret"], "no password in the repository"
    server = redis_container()
    assert option_of(server["args"], "--requirepass") == "$(SWITCHYARD_REDIS_PASSWORD)"
    assert secret_ref(server, "SWITCHYARD_REDIS_PASSWORD") == password
    assert secret_ref(server, "REDISCLI_AUTH") == password  # redis-cli in it, for operators
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(server[probe]["exec"]["command"])  # see redis.yaml
        assert "env -u REDISCLI_AUTH redis-cli ping | grep -q -e PONG -e NOAUTH" in command, probe
    for name in SWITCHYARD_DEPLOYMENTS:
        assert secret_ref(container(name), "SWITCHYARD_REDIS_PASSWORD") == password, name


def test_kustomize_builds_the_whole_set(tmp_path: Path) -> None:
    """``kubectl kustomize`` (no cluster needed): the Secret made from redis.env, under the name
    every reference uses, and every object labelled as Switchyard's."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (Debian: kubernetes-client)")
    shutil.copytree(MANIFESTS, tmp_path / "kubernetes", ignore=shutil.ignore_patterns("redis.env"))
    (tmp_path / "kubernetes" / "redis.env").write_text("password=not-a-real-one\n")
    done = subprocess.run(
        [kubectl, "kustomize", str(tmp_path / "kubernetes")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    (secret,) = [d for d in built if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "switchyard-redis"
    assert base64.b64decode(secret["data"]["password"]) == b"not-a-real-one"
    kubernetes_validate.validate(secret, KUBERNETES, strict=True)
    refs = re.findall(r"secretKeyRef:\s+key: \w+\s+name: (\S+)", done.stdout)
    assert len(refs) == 2 + len(SWITCHYARD_DEPLOYMENTS) and set(refs) == {secret["metadata"]["name"]}
    assert len(built) == len(documents()) + 1
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "switchyard" for d in built)
