"""compose.yaml and the Dockerfile, checked offline (no Docker engine here): the Compose
specification's schema, and that the files agree with the code and the monitoring configuration."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from shared.settings import BackgroundSettings, GatewaySettings, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "monitoring" / "prometheus-compose.yml"


def with_defaults(text: str) -> str:
    """compose.yaml as Compose reads it when none of the variables it names is set: each
    ``${NAME:-default}`` becomes its default (``${NAME}`` becomes empty)."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m[1] or "", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # Compose resolves YAML anchors and merge keys before applying its schema; so does PyYAML.
    raw = yaml.safe_load(with_defaults(COMPOSE.read_text()))
    spec = PyCompose.from_json(json.dumps(raw))
    spec.to_spec()  # raises ValueError on anything the Compose specification does not allow
    doc: dict[str, Any] = spec.to_dict()
    return doc


def test_the_services_and_their_references_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "gateway", "worker", "background", "prometheus", "grafana"} <= services.keys()
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on a missing service {dependency}"
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in volumes, f"{name} mounts an undeclared volume {source}"


def test_workers_scale_and_are_found_where_prometheus_looks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker, gateway = services["worker"], services["gateway"]
    assert not worker.get("ports"), "published worker ports would collide under --scale worker=N"
    jobs = {
        job["job_name"]: job["dns_sd_configs"][0]
        for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    }
    assert jobs["switchyard-worker"]["names"] == ["worker"]
    assert jobs["switchyard-worker"]["port"] == int(worker["environment"]["SWITCHYARD_METRICS_PORT"])
    assert jobs["switchyard-gateway"]["names"] == ["gateway"]
    assert jobs["switchyard-gateway"]["port"] == int(
        gateway["command"][gateway["command"].index("--port") + 1]
    )
    assert "8000:8000" in gateway["ports"]


def test_every_setting_named_is_one_the_code_reads(compose: dict[str, Any]) -> None:
    known = {"REDIS_URL"}
    for settings in (GatewaySettings, BackgroundSettings, WorkerSettings):
        known |= {f"SWITCHYARD_{name.upper()}" for name in settings.model_fields}
    for name, service in compose["services"].items():
        if service.get("image") != "switchyard:latest":
            continue
        named = set(service.get("environment") or {})
        assert named <= known, f"{name} sets unknown variables {named - known}"
        assert named >= {"REDIS_URL"}, f"{name} would look for Redis on its own localhost"


def test_commands_are_cli_commands_and_shutdown_has_time_to_drain(compose: dict[str, Any]) -> None:
    for name in ("gateway", "worker", "background"):
        command = compose["services"][name]["command"]
        assert command[0] == "switchyard"
        done = subprocess.run(
            [sys.executable, "-m", "control.cli", *command[1:], "--help"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, f"{name}: {done.stderr[-500:]}"
    grace = re.fullmatch(r"(\d+)s", compose["services"]["worker"]["stop_grace_period"])
    assert grace is not None and int(grace[1]) > WorkerSettings().drain_timeout
    grace = re.fullmatch(r"(\d+)s", compose["services"]["gateway"]["stop_grace_period"])
    assert grace is not None and int(grace[1]) > GatewaySettings().shutdown_grace


def test_healthchecks_ask_whether_ready(compose: dict[str, Any]) -> None:
    gateway, worker = compose["services"]["gateway"], compose["services"]["worker"]
    assert "127.0.0.1:8000/readyz" in " ".join(gateway["healthcheck"]["test"])
    port = worker["environment"]["SWITCHYARD_METRICS_PORT"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(worker["healthcheck"]["test"])


def test_the_image_holds_every_package_the_project_installs() -> None:
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY (\w+) \1$", text, flags=re.MULTILINE))
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in found["include"]}
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"
    assert all((ROOT / p / "__init__.py").is_file() for p in packages)
    placeholders = re.search(r"mkdir ([\w ]+?) *\\\n", text)
    assert placeholders is not None and set(placeholders.group(1).split()) == packages
    checked = re.search(r'python -c "import ([\w., ]+)"', text)
    assert checked is not None and packages <= {m.split(".")[0] for m in checked.group(1).split(", ")}
    assert 'pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} ".[$ENGINE]"' in text
    assert "pip install --no-deps ." in text  # the code, over the dependencies' layer


def test_gateway_and_background_share_the_uploaded_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    dirs = {services[name]["environment"]["SWITCHYARD_FILES_DIR"] for name in ("gateway", "background")}
    assert len(dirs) == 1, "the background service would not find the files the gateway stored"
    (files_dir,) = dirs
    for name in ("gateway", "background"):
        assert f"files:{files_dir}" in services[name]["volumes"], name
    assert (
        int(services["background"]["stop_grace_period"].removesuffix("s"))
        > BackgroundSettings().background_drain_timeout
    )


def test_local_images_are_the_ones_compose_yaml_can_be_pointed_at() -> None:
    """deploy/images.sh prints the variables compose.yaml reads for its images and the base."""
    script = (ROOT / "deploy" / "images.sh").read_text()
    printed = set(re.findall(r'^echo "export (SWITCHYARD_\w+)=', script, flags=re.MULTILINE))
    read = set(re.findall(r"\$\{(SWITCHYARD_\w+_IMAGE):-", COMPOSE.read_text()))
    assert (
        printed == read == {"SWITCHYARD_BASE_IMAGE", "SWITCHYARD_REDIS_IMAGE", "SWITCHYARD_PROMETHEUS_IMAGE"}
    )
    assert "ARG BASE_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    assert "${SWITCHYARD_BASE_IMAGE:-python:3.11-slim}" in COMPOSE.read_text()
