"""One local Ray cluster for all integration tests, deployed with `serve deploy`.

The deployed config is configs/scripted.yaml (the example fleet on the scripted model),
verbatim but for the HTTP port and a runtime_env that exports spans to a file, plus a second
application (tests/integration/fleet-test.yaml) whose scripted model drives every path
of the agent loop. The cluster is stopped when the package's tests end, even on failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve.lifecycle.evals import EVALS_FILE, EvalSuite, load_suite
from serve.lifecycle.local import with_rules
from serve.lifecycle.runner import scripted_rules
from serve.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
# Keys of the test application's tenants (fleet-test.yaml holds only their hashes).
QA_KEY = "fk-test-qa"  # role qa: tester, helper, relay
ACME_KEY = "fk-test-acme"  # role employee: not the test agents
LIMITED_KEY = "fk-test-limited"  # role qa, but its key grants no scopes
QA2_KEY = "fk-test-qa2"  # role qa, another tenant (qa2): memory isolation
SPENDER_KEY = "fk-test-spender"  # role qa, a tenant with a daily budget (test_budget_http)
SPENDER_ADMIN_KEY = "fk-test-spender-admin"  # the spender tenant, role admin: may overdraw its day
HOLDER_KEY = "fk-test-holder"  # role qa, a tenant whose held reservations die with keeper's replicas
HASTY_KEY = "fk-test-hasty"  # role qa, a tenant with 3 requests a minute (test_budget_http)
APPROVER_KEY = "fk-test-approver"  # tenant ops, role approver: decides on gated calls (test_approvals_http)
QA_APPROVER_KEY = "fk-test-qa-approver"  # tenant qa, roles qa and approver: asks, and decides others'


def example_suites() -> list[EvalSuite]:
    suites = [load_suite(path.parent) for path in sorted((ROOT / "agents").glob(f"*/{EVALS_FILE}"))]
    return [s for s in suites if s is not None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hooks:
    """A local webhook receiver: the approvals service posts each approval here. Its first
    POST of every approval is answered 503, so the service's retry is exercised."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.received: list[dict[str, Any]] = []
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                first = all(r["approval"]["id"] != body["approval"]["id"] for r in hooks.received)
                hooks.received.append(body)
                self.send_response(503 if first else 204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass(frozen=True)
class Fleet:
    url: str  # the example fleet (configs/local.yaml), e.g. http://127.0.0.1:PORT
    test_url: str  # the test application's prefix
    dashboard: str
    logs_dir: Path
    audit_log: Path  # the test application's
    ray_address: str | None  # the cluster's GCS address (None: not known when reusing one)
    metrics_url: str | None = None  # Ray's Prometheus endpoint (None: not known when reusing one)
    spans: Path | None = None  # spans of both applications (FLEET_TRACES_FILE)
    runs: Path | None = None  # the test agents' gated tools write a line per run (FLEET_TEST_RUNS)
    hooks: Hooks | None = None  # where tester's approvals are posted (approvals.webhooks)

    def client(self, base: str | None = None, key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=base or self.url, timeout=60, headers=headers)


@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    import ray
    from ray import serve as rayserve

    from serve.cli import wait_running

    reuse = os.environ.get("FLEET_TEST_REUSE")  # "PORT,DASHBOARD[,GCS]": a cluster deployed by hand
    if reuse:
        port_text, dashboard, *gcs = reuse.split(",")
        url = f"http://127.0.0.1:{port_text}"
        audit = ROOT / "var/audit/fleet-test.jsonl"
        logs = Path("/tmp/ray/session_latest/logs")
        yield Fleet(url, url + "/test", dashboard, logs, audit, gcs[0] if gcs else None)
        return
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_SERVE_LOG_TO_STDERR="0", RAY_DEDUP_LOGS="0")
    port, dash_port, metrics_port = free_port(), free_port(), free_port()
    work = tmp_path_factory.mktemp("fleet")
    spans = work / "spans.jsonl"
    config = yaml.safe_load((ROOT / "configs/scripted.yaml").read_text())
    config["http_options"]["port"] = port
    # The example agents' eval suites script their models' attacks (test_evals_http): the
    # fleet plays them first, each for its case's own message only.
    config = with_rules(config, scripted_rules(example_suites()))
    # Tracing on, to a file, exported quickly: the observability tests read it.
    tracing = {"FLEET_TRACES_FILE": str(spans), "OTEL_BSP_SCHEDULE_DELAY": "200"}
    config["applications"][0]["runtime_env"]["env_vars"].update(tracing)  # beside the config's own
    test_app = yaml.safe_load((HERE / "fleet-test.yaml").read_text())
    test_app["args"]["models"]["upstream"]["base_url"] = f"http://127.0.0.1:{port}/test/v1"
    test_app["runtime_env"]["env_vars"].update(FLEET_TEST_UPSTREAM_KEY=QA_KEY, **tracing)
    audit_log = work / "audit" / "fleet-test.jsonl"
    test_app["args"]["governance"]["audit"]["path"] = str(audit_log)
    test_app["args"]["memory"]["path"] = str(work / "memory" / "fleet-test.db")
    test_app["args"]["budgets"]["path"] = str(work / "budget" / "fleet-test.db")
    test_app["args"]["approvals"]["path"] = str(work / "approvals" / "fleet-test.db")
    test_app["runtime_env"]["env_vars"]["FLEET_TEST_RUNS"] = str(work / "runs.jsonl")
    hooks = Hooks()
    test_app["args"]["approvals"]["webhooks"] = {"tester": hooks.url}
    config["applications"].append(test_app)
    config_path = work / "deploy.yaml"
    config_path.write_text(yaml.safe_dump(config))

    info = ray.init(
        address="local",
        # Logical CPUs: the test applications and the bench's rungs hold ~40 replicas of
        # 0.1 CPU each, all waiting on I/O; 2 real cores run them.
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dash_port,
        log_to_driver=False,
        _temp_dir=str(work / "ray"),
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    dashboard = f"http://{info.dashboard_url}"
    try:
        _serve_deploy(config_path, dashboard)
        wait_running(["fleet", "fleet-test"], timeout_s=240, dashboard=dashboard)
        logs = Path(info.address_info["session_dir"]) / "logs"
        url = f"http://127.0.0.1:{port}"
        gcs = info.address_info["gcs_address"]
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        runs = work / "runs.jsonl"
        yield Fleet(url, url + "/test", dashboard, logs, audit_log, gcs, metrics, spans, runs, hooks)
    finally:
        try:
            rayserve.shutdown()
        finally:
            hooks.close()
            ray.shutdown()
            _wait_closed(info.address_info["gcs_address"], timeout_s=60)


def _wait_closed(address: str, timeout_s: float) -> None:
    """Wait until the cluster's GCS stops listening: ray.shutdown returns while its processes
    are still exiting, and the e2e package's `ray start --head` refuses a port still held
    (a CI run failed so, "Ray is ... already running at ...:6379")."""
    host, port = address.rsplit(":", 1)

    def closed() -> bool:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return False
        except OSError:
            return True

    try:
        wait_until(closed, timeout_s, interval_s=0.5)
    except TimeoutError:
        raise RuntimeError(
            f"the test cluster's GCS still listens at {address} {timeout_s:g}s after ray.shutdown"
        ) from None


def _serve_deploy(config_path: Path, dashboard: str) -> None:
    # The dashboard answers a few seconds after ray.init returns; serve deploy fails fast
    # until then, so retry on connection errors only.
    attempts: list[subprocess.CompletedProcess[str]] = []

    def deployed() -> bool:
        done = subprocess.run(
            [str(BIN / "serve"), "deploy", str(config_path), "-a", dashboard],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        attempts.append(done)
        if done.returncode != 0 and "Connect" not in done.stderr + done.stdout:
            raise RuntimeError(f"serve deploy failed:\n{done.stdout}\n{done.stderr}")
        return done.returncode == 0

    try:
        wait_until(deployed, timeout_s=60, interval_s=1)
    except TimeoutError:
        last = attempts[-1]
        raise RuntimeError(f"serve deploy failed:\n{last.stdout}\n{last.stderr}") from None


@pytest.fixture
def api(fleet: Fleet) -> Iterator[httpx.Client]:
    with fleet.client() as client:
        yield client


@pytest.fixture
def test_api(fleet: Fleet) -> Iterator[httpx.Client]:
    with fleet.client(fleet.test_url, QA_KEY) as client:
        yield client
