"""The OPA engine speaks OPA's Data API; checked against a server that answers like OPA."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from serve.errors import PolicyFailure
from serve.governance.config import GovernanceConfig, build_engines
from serve.policy.engine import OpaEngine
from tests.unit.conftest import ROOT, run


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
                answer = {"result": asyncio.run(engine.evaluate(parts[1], body["input"])).model_dump()}
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

    async def ask() -> list[str]:  # one loop: the client's connections belong to it
        allowed = await engine.evaluate("ingress", DOC)
        denied = await engine.evaluate("ingress", {**DOC, "action": {"agent": "hr-policy-advisor"}})
        return [allowed.outcome, denied.outcome]

    assert run(ask()) == ["allow", "deny"]
    assert engine.describe("ingress") == ("opa:fleet.ingress", "server")


def test_undefined_result_fails_closed(opa_url: str) -> None:
    with pytest.raises(PolicyFailure, match="undefined"):
        run(OpaEngine(opa_url, timeout_s=2).evaluate("ingress", {**DOC, "ok": False}))


def test_unreachable_server_fails_closed() -> None:
    with pytest.raises(PolicyFailure, match="OPA server failed"):
        run(OpaEngine("http://127.0.0.1:9", timeout_s=0.5).evaluate("ingress", DOC))


def test_config_selects_the_opa_engine(opa_url: str) -> None:
    config = GovernanceConfig.model_validate({"engine": {"kind": "opa", "url": opa_url}})
    engine, _ = build_engines(config, ROOT)
    assert isinstance(engine, OpaEngine)
    assert run(engine.evaluate("ingress", DOC)).outcome == "allow"


def test_a_server_that_does_not_answer_in_time_fails_closed_without_blocking_the_loop() -> None:
    """The timeout holds for the async client too, and other requests go on meanwhile."""
    release = threading.Event()

    class Holding(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            release.wait(10)  # held until the test is done: the client's timeout must end it first

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Holding)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    engine = OpaEngine(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=0.3)

    async def ask() -> tuple[str, list[str]]:
        order: list[str] = []

        async def meanwhile() -> None:
            order.append("other request")

        task = asyncio.get_running_loop().create_task(meanwhile())
        try:
            await engine.evaluate("ingress", DOC)
        except PolicyFailure as exc:
            order.append("failed closed")
            await task
            return str(exc), order
        raise AssertionError("a held server answered")

    try:
        message, order = run(ask())
    finally:
        release.set()
        server.shutdown()
    assert "OPA server failed" in message
    assert order == ["other request", "failed closed"]  # a blocking client would hold the loop
