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


REQUIRED = "given-by-the-user"
"""What a variable compose.yaml requires (``${NAME:?message}``) stands for here."""


def with_defaults(text: str) -> str:
    """compose.yaml as Compose reads it when only the variables it requires are set: each
    ``${NAME:-default}`` becomes its default (``${NAME}`` becomes empty), each ``${NAME:?message}``
    :data:`REQUIRED`."""

    def value(m: re.Match[str]) -> str:
        return REQUIRED if m[2] is not None else m[1] or ""

    return re.sub(r"\$\{\w+(?::?-([^}]*)|:?\?([^}]*))?\}", value, text)


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
    # The gateway's metrics port, which is not its API's and is not published.
    api = int(gateway["command"][gateway["command"].index("--port") + 1])
    assert jobs["switchyard-gateway"]["port"] == int(gateway["environment"]["SWITCHYARD_METRICS_PORT"]) != api
    assert gateway["ports"] == ["8000:8000"]


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


SWITCHYARD_SERVICES = ("gateway", "worker", "background")
CONTEXT_TOKENS = 32_768
"""The longest prompt a job may carry, in tokens, for the memory budget: a 7B model's context (the
demo model's is 2,048)."""
TOKEN_ID_BYTES = 7
"""A prompt token id in a job's JSON: up to six digits and a comma."""
REDIS_UNITS = {"": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


def redis_bytes(value: str) -> int:
    """A Redis memory figure (``2gb``, ``512mb``, ``1000000``) in bytes, as Redis reads it."""
    found = re.fullmatch(r"(\d+)([kmg]b?)?", value.lower())
    assert found is not None, value
    return int(found[1]) * REDIS_UNITS[found[2] or ""]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_redis_wants_a_password_every_client_has(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis = services["redis"]
    assert option(redis["command"], "--requirepass") == REQUIRED
    assert redis["environment"]["REDISCLI_AUTH"] == REQUIRED  # redis-cli in it, for operators
    check = redis["healthcheck"]["test"]  # a CMD-SHELL check is read as its shell command
    probe = "env -u REDISCLI_AUTH redis-cli ping | grep -q -e PONG -e NOAUTH"  # see compose.yaml
    assert probe in (check if isinstance(check, str) else " ".join(check))
    for name in SWITCHYARD_SERVICES:
        env = services[name]["environment"]
        assert env["SWITCHYARD_REDIS_PASSWORD"] == REQUIRED, name
        assert "@" not in env["REDIS_URL"], "the password stays out of the URL"
    # No default password: Compose refuses to start until one is set.
    text = COMPOSE.read_text()
    uses = re.findall(r"\$\{SWITCHYARD_REDIS_PASSWORD(:?.)?", text)
    assert uses and set(uses) == {":?"}, uses


def test_only_the_gateway_is_published(compose: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert published.pop("gateway") == ["8000:8000"]
    assert set(published) == {"prometheus", "grafana"}
    for name, ports in published.items():
        assert all(p.startswith("127.0.0.1:") for p in ports), f"{name} must listen on loopback only"
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_every_container_is_unprivileged_and_read_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"] and not service.get("cap_add"), name
        assert "no-new-privileges" in service.get("security_opt", []), name
    assert services["redis"]["user"] == "redis"
    # What Switchyard's roles write: their volumes, and vLLM's, torch's and Triton's caches in
    # /tmp (the image's HOME), which must allow executing the kernels compiled there.
    text = DOCKERFILE.read_text()
    home = re.search(r"\bHOME=(\S+)", text)
    assert home is not None
    for name in SWITCHYARD_SERVICES:
        tmpfs = {entry.split(":")[0]: entry for entry in services[name]["tmpfs"]}
        assert set(tmpfs) == {"/tmp", home[1]}, name
        assert all("exec" in entry.split(":")[1].split(",") for entry in tmpfs.values()), name


def test_the_image_runs_as_a_user_who_owns_its_volumes(compose: dict[str, Any]) -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\d+):(\d+)$", text, flags=re.MULTILINE)
    assert len(users) == 1 and int(users[0][0]) != 0, "a numeric user, so runAsNonRoot can check it"
    after = text[text.index("\nUSER ") :]
    assert "\nRUN " not in after, "build steps run as root, before USER"
    owned = re.search(r"chown (\d+|switchyard):\S+ ([^\n]+)", text)
    assert owned is not None
    targets = {m.split(":")[1] for n in SWITCHYARD_SERVICES for m in compose["services"][n]["volumes"]}
    # A volume mounted for the first time takes its owner from the image's directory.
    assert targets <= set(owned[2].split()), targets - set(owned[2].split())


def test_redis_memory_holds_every_byte_quota_with_room_to_spare(compose: dict[str, Any]) -> None:
    """Redis never evicts (a job evicted would be lost), so what may be written to it must fit:
    each model's waiting and running jobs and its dead letters, each about its request body and
    its prompt's token ids, within three quarters of maxmemory (the rest: tenants, records,
    answers kept for idempotent retries). File bytes are on a volume, not in Redis."""
    services = compose["services"]
    command = services["redis"]["command"]
    assert option(command, "--maxmemory-policy") == "noeviction"
    maxmemory = redis_bytes(option(command, "--maxmemory"))
    for name in SWITCHYARD_SERVICES:
        env = services[name]["environment"]
        named = {k.removeprefix("SWITCHYARD_").lower(): v for k, v in env.items() if k != "REDIS_URL"}
        settings = BackgroundSettings(**named)
        assert settings.file_store == "directory", name
        job = settings.max_body_bytes + TOKEN_ID_BYTES * CONTEXT_TOKENS
        held = (settings.max_backlog_total + settings.dead_letter_max) * job
        assert held <= 0.75 * maxmemory, f"{name}: {held} bytes of jobs, {maxmemory} bytes of Redis"
