"""Secure by default on a real Ray: with keys on, every endpoint but health needs one; the
request id is the server's; the builder learns from Serve itself where it listens."""

from __future__ import annotations

import re

import pytest

from tests.integration.conftest import QA_KEY, Fleet

READ_ROUTES = ["/v1/models", "/v1/agents", "/v1/agents/tester", "/v1/docs", "/v1/openapi.json"]


def test_with_keys_every_endpoint_but_health_needs_one(fleet: Fleet) -> None:
    with fleet.client(fleet.test_url) as anyone, fleet.client(fleet.test_url, QA_KEY) as keyed:
        for path in READ_ROUTES:
            refused = anyone.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"] == "Bearer", path
            assert refused.json()["error"]["type"] == "authentication_error", path
            assert keyed.get(path).status_code == 200, path
        # Mounted under /test: the schema names its server there, and the page loads it from there.
        assert keyed.get("/v1/openapi.json").json()["servers"] == [{"url": "/test"}]
        assert "/test/v1/openapi.json" in keyed.get("/v1/docs").text
        assert anyone.get("/v1/health").json() == {"status": "ok"}  # no agent list without a key


def test_the_request_id_is_the_servers_and_opens_its_explanation(fleet: Fleet) -> None:
    body = {"model": "tester", "messages": [{"role": "user", "content": "hello"}]}
    with fleet.client(fleet.test_url, QA_KEY) as client:
        r = client.post("/v1/chat/completions", json=body, headers={"x-request-id": "ticket-17"})
        request_id = r.headers["x-fleet-request-id"]
        assert re.fullmatch(r"req_[0-9a-f]{32}", request_id) and r.json()["fleet"]["request_id"] == request_id
        assert r.json()["fleet"]["correlation_id"] == r.headers["x-request-id"] == "ticket-17"
        assert client.get(f"/v1/requests/{request_id}/explain").json()["request_id"] == request_id
        assert client.get("/v1/requests/ticket-17/explain").status_code == 404  # a client's id keys nothing


def test_the_builder_asks_serve_where_it_listens() -> None:
    import ray

    from serve.app import serve_http_host

    if not ray.is_initialized():
        pytest.skip("a reused cluster (FLEET_TEST_REUSE): this process is not connected to it")
    assert serve_http_host() == "127.0.0.1"
