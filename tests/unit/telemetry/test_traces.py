"""Tracing setup from the standard OTEL_* variables: spans reach an OTLP/HTTP receiver."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.unit.conftest import ROOT

SCRIPT = """
from serve import telemetry
from opentelemetry import trace
telemetry.setup_tracing()
span = telemetry.tracer().start_span("invoke_agent canary-agent")
print(telemetry.trace_id(span))
span.end()
provider = trace.get_tracer_provider()
if hasattr(provider, "shutdown"):  # the SDK's: flush the batch (the API's no-op has none)
    provider.shutdown()
"""


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """An HTTP server standing in for a collector's OTLP/HTTP endpoint: keeps what it gets."""
    received: list[tuple[str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLEET_"))}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_otlp_http_endpoint_gets_the_spans(receiver: tuple[str, list[tuple[str, bytes]]]) -> None:
    url, received = receiver
    done = run(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "fleet-test",
        }
    )
    assert done.returncode == 0, done.stderr
    trace_id = done.stdout.strip()
    assert len(trace_id) == 32
    [(path, body)] = received
    assert path == "/v1/traces"
    assert b"invoke_agent canary-agent" in body and b"fleet-test" in body
    assert bytes.fromhex(trace_id) in body


def test_without_settings_tracing_is_off() -> None:
    done = run({})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"  # the API's no-op span has no trace id


def test_file_setting_writes_spans(tmp_path: Any) -> None:
    spans = tmp_path / "spans.jsonl"
    done = run({"FLEET_TRACES_FILE": str(spans)})
    assert done.returncode == 0, done.stderr
    assert '"name":"invoke_agent canary-agent"' in spans.read_text()
