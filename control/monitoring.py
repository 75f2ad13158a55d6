"""A Prometheus server for `switchyard up --monitoring`, scraping the gateway and workers it started.

Prometheus is an external binary (Debian/Ubuntu: ``apt-get install prometheus``); without it the
system runs unmonitored. The configuration is generated for the actual ports, as JSON (which is
valid YAML, so no YAML writer is needed), with the alert rules shipped in ``monitoring/alerts.yml``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from control.processes import StartupError, answers_ok, check_port_free, stop_process, wait_until

DEFAULT_PORT = 9090
ALERT_RULES = Path(__file__).resolve().parent.parent / "monitoring" / "alerts.yml"
INSTALL_HINT = (
    "switchyard: prometheus not found on PATH; running without monitoring "
    "(install it with: sudo apt-get install prometheus, or from https://prometheus.io/download/)"
)
GATEWAY_JOB = "switchyard-gateway"
WORKER_JOB = "switchyard-worker"
READY_TIMEOUT = 30.0
STOP_GRACE = 10.0


def prometheus_config(
    gateways: list[str], workers: list[str], rules: Path | None, interval: float = 5.0
) -> dict[str, object]:
    """A Prometheus configuration scraping ``host:port`` targets under the contract's job names."""
    every = f"{int(interval * 1000)}ms"
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every},
        "rule_files": [str(rules)] if rules else [],
        "scrape_configs": [
            {"job_name": GATEWAY_JOB, "static_configs": [{"targets": gateways}]},
            {"job_name": WORKER_JOB, "static_configs": [{"targets": workers}]},
        ],
    }


@dataclass
class Prometheus:
    """One Prometheus process with its own temporary storage, on a loopback port."""

    gateways: list[str]
    workers: list[str]
    port: int = DEFAULT_PORT
    rules: Path | None = ALERT_RULES
    interval: float = 5.0
    binary: str = "prometheus"
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _dir: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, log: Path | None = None) -> Prometheus:
        """Start the server and wait until it answers ``/-/ready``; output goes to ``log``."""
        check_port_free(self.host, self.port)
        self._dir = tempfile.TemporaryDirectory(prefix="switchyard-prometheus-")
        workdir = Path(self._dir.name)
        rules = self.rules if self.rules and self.rules.is_file() else None
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps(prometheus_config(self.gateways, self.workers, rules, self.interval)))
        out = (log or workdir / "prometheus.log").open("ab")
        try:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.host}:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the supervisor only, which stops it in order
            )
        finally:
            out.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        process = self.process
        assert process is not None

        def exited() -> None:
            if process.poll() is not None:
                self.stop()
                raise StartupError(f"prometheus exited with status {process.returncode}")

        if wait_until(lambda: answers_ok(f"{self.url}/-/ready", timeout=1), READY_TIMEOUT, watch=exited):
            return
        self.stop()
        raise StartupError(f"prometheus did not become ready on {self.url} in {READY_TIMEOUT:.0f}s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=STOP_GRACE)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Monitoring:
    """Prometheus beside ``switchyard up --monitoring``: optional, and never a reason not to serve."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.binary = shutil.which("prometheus") if port is not None else None
        self.server: Prometheus | None = None

    def check(self) -> None:
        """Before anything starts: say when Prometheus is missing, fail early when its port is taken."""
        if self.port is None:
            return
        if self.binary is None:
            print(INSTALL_HINT, flush=True)
            return
        try:
            check_port_free("127.0.0.1", self.port)
        except StartupError as exc:
            raise StartupError(
                f"port {self.port} for Prometheus is in use; choose another with --prometheus-port"
            ) from exc

    def start(self, gateway_host: str, gateway_metrics_port: int, worker_ports: list[int]) -> None:
        """Scrape the gateway's and the local workers' metrics ports, with the alert rules."""
        if self.port is None or self.binary is None:
            return
        host = "127.0.0.1" if gateway_host in ("0.0.0.0", "::", "") else gateway_host
        workers = [f"127.0.0.1:{p}" for p in worker_ports]
        gateways = [f"{host}:{gateway_metrics_port}"]
        self.server = Prometheus(gateways, workers, port=self.port, binary=self.binary)
        self.server.start()

    def describe(self) -> str:
        if self.server is None:
            return ""
        return f"Prometheus: {self.server.url}   (alerts: {self.server.url}/alerts)\n"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
