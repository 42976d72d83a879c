"""The OPA engine speaks OPA's Data API; checked against a server that answers like OPA."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from serve.errors import PolicyFailure
from serve.governance.config import GovernanceConfig, build_engines
from serve.policy.engine import OpaEngine
from tests.unit.conftest import ROOT


@pytest.fixture(scope="module")
def opa_url() -> Iterator[str]:
    """An HTTP server with OPA's ``POST /v1/data/<path>`` contract, evaluating configs/policies."""
    engine, _ = build_engines(GovernanceConfig(), ROOT)
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append(self.path)
            parts = self.path.removeprefix("/v1/data/").split("/")
            answer: dict[str, Any] = {}
            if parts[:1] == ["fleet"] and parts[2:] == ["decision"] and body["input"].get("ok", True):
                answer = {"result": engine.evaluate(parts[1], body["input"]).model_dump()}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


DOC = {
    "version": "fleet.policy/v1",
    "point": "ingress",
    "request": {"id": "r", "chain": []},
    "principal": {"tenant": "acme", "roles": ["sre"], "authenticated": True},
    "agent": {
        "name": "fleet-monitor",
        "version": "1",
        "role": "infrastructure",
        "scopes": [],
        "declared_scopes": [],
        "data": [],
        "pii": "block",
        "compliance": [],
        "delegates": [],
    },
    "action": {"agent": "fleet-monitor"},
}


def test_decisions_come_from_the_server(opa_url: str) -> None:
    engine = OpaEngine(opa_url, timeout_s=2)
    assert engine.evaluate("ingress", DOC).outcome == "allow"
    assert engine.evaluate("ingress", {**DOC, "action": {"agent": "hr-policy-advisor"}}).outcome == "deny"
    assert engine.describe("ingress") == ("opa:fleet.ingress", "server")


def test_undefined_result_fails_closed(opa_url: str) -> None:
    with pytest.raises(PolicyFailure, match="undefined"):
        OpaEngine(opa_url, timeout_s=2).evaluate("ingress", {**DOC, "ok": False})


def test_unreachable_server_fails_closed() -> None:
    with pytest.raises(PolicyFailure, match="OPA server failed"):
        OpaEngine("http://127.0.0.1:9", timeout_s=0.5).evaluate("ingress", DOC)


def test_config_selects_the_opa_engine(opa_url: str) -> None:
    config = GovernanceConfig.model_validate({"engine": {"kind": "opa", "url": opa_url}})
    engine, _ = build_engines(config, ROOT)
    assert isinstance(engine, OpaEngine)
    assert engine.evaluate("ingress", DOC).outcome == "allow"
