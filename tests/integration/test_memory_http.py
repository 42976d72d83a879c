"""Shared memory through the HTTP API: sessions across replicas, a request tree's shared
context and artifacts, long-term facts per tenant and scope, and a memory service restart.

The `keeper` agent runs two replicas; it delegates to `reader` (tests/integration/agents).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serve.testing import wait_until
from tests.integration.agents.keeper.tools import table
from tests.integration.conftest import LIMITED_KEY, QA2_KEY, Fleet

pytestmark = pytest.mark.integration


def ask(client: httpx.Client, text: str, session: str | None = None, **extra: Any) -> httpx.Response:
    headers = {"x-fleet-session-id": session} if session else {}
    body = {"model": "keeper", "messages": [{"role": "user", "content": text}], **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


@pytest.fixture
def other_tenant(fleet: Fleet) -> Iterator[httpx.Client]:
    with fleet.client(fleet.test_url, QA2_KEY) as client:
        yield client


def test_a_session_survives_a_change_of_replica(test_api: httpx.Client) -> None:
    session = "s-" + uuid.uuid4().hex
    first = answer(ask(test_api, "#who first", session))
    replicas = {first.split(";")[0].removeprefix("replica ")}
    assert first.endswith("earlier: ")  # a new session has no history
    said = "#who first"
    for i in range(30):  # the router picks replicas at random: keep talking until both answered
        text = f"#who turn{i}"
        reply = answer(ask(test_api, text, session))
        assert reply.endswith(f"earlier: {said}"), reply  # whichever replica answered, it knew
        replicas.add(reply.split(";")[0].removeprefix("replica "))
        said = text
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, "both replicas of keeper should have served the session"


def test_sessions_are_per_tenant_and_named_by_header_or_metadata(
    test_api: httpx.Client, other_tenant: httpx.Client
) -> None:
    session = "s-" + uuid.uuid4().hex
    answer(ask(test_api, "my secret plan", session))
    # The same session id, from another tenant, is another conversation.
    assert answer(ask(other_tenant, "what did I say?", session)).endswith("earlier: ")
    # metadata.session_id names the same session as the header.
    reply = ask(test_api, "what did I say?", metadata={"session_id": session})
    assert answer(reply).endswith("earlier: my secret plan")
    assert reply.json()["fleet"]["session_id"] == session
    # Without a session, nothing is remembered.
    assert answer(ask(test_api, "and now?")).endswith("earlier: ")


def test_a_bad_session_id_is_a_400_naming_it(test_api: httpx.Client) -> None:
    r = ask(test_api, "hi", "no spaces allowed")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "x-fleet-session-id"
    r = ask(test_api, "hi", metadata={"session_id": "x" * 200})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata.session_id"


def test_streaming_turns_join_the_session(test_api: httpx.Client) -> None:
    session = "s-" + uuid.uuid4().hex
    with test_api.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "keeper", "stream": True, "messages": [{"role": "user", "content": "streamed hello"}]},
        headers={"x-fleet-session-id": session},
    ) as r:
        assert r.status_code == 200
        body = "".join(r.iter_text())
    assert "data: [DONE]" in body
    assert answer(ask(test_api, "again", session)).endswith("earlier: streamed hello")


def test_delegation_shares_context_both_ways(test_api: httpx.Client) -> None:
    r = ask(test_api, "#share pineapple")
    # keeper wrote `fact`, reader read it and wrote `reply`, keeper read that back.
    assert answer(r) == "shared back: reader saw pineapple"
    assert r.json()["fleet"]["delegations"] == ["reader"]


def test_a_large_artifact_passes_by_reference(test_api: httpx.Client) -> None:
    megabytes = 8
    r = ask(test_api, f"#artifact {megabytes}")
    report = json.loads(answer(r).removeprefix("reader: "))
    assert report == {
        "sha256": hashlib.sha256(table(megabytes)).hexdigest(),
        "bytes": megabytes << 20,
        "zero_copy": True,  # read in place from Ray's object store, not copied through a body
    }
    # The exchange between the agents stayed small: the table never entered a message.
    assert int(r.headers["content-length"]) < 4096


def test_facts_are_per_tenant_and_scoped(
    fleet: Fleet, test_api: httpx.Client, other_tenant: httpx.Client
) -> None:
    key = "k" + uuid.uuid4().hex[:12]
    assert answer(ask(test_api, f"#remember {key} mangosteen")) == f"remembered qa/{key}"
    assert answer(ask(test_api, f"#recall qa {key}")) == "recalled: mangosteen"
    assert key in answer(ask(test_api, "#search mangosteen"))
    # Another tenant, same namespace and key: nothing there.
    assert answer(ask(other_tenant, f"#recall qa {key}")) == f"recalled: nothing is remembered under qa/{key}"
    assert "no fact" in answer(ask(other_tenant, "#search mangosteen"))
    # No scope for the namespace: the model is told, and the refusal is on record.
    denied = ask(test_api, f"#recall hr {key}")
    assert "memory:hr:read is not granted to keeper" in answer(denied)
    request_id = denied.json()["fleet"]["request_id"]
    records = _records(fleet, request_id)
    assert [(r["action"], r["outcome"]) for r in records if r["point"] == "memory"] == [
        ("memory:read:facts:hr", "deny")
    ]
    # A key that grants no scopes narrows keeper's: even its own namespace is refused.
    with fleet.client(fleet.test_url, LIMITED_KEY) as limited:
        assert "memory:qa:read is not granted" in answer(ask(limited, f"#recall qa {key}"))


def _records(fleet: Fleet, request_id: str) -> list[dict[str, Any]]:
    def written() -> list[dict[str, Any]]:
        lines = fleet.audit_log.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("request_id") == request_id]

    return wait_until(written, timeout_s=10, interval_s=0.1)


def test_memory_survives_a_restart_of_its_service(fleet: Fleet, test_api: httpx.Client) -> None:
    import ray

    key, session = "k" + uuid.uuid4().hex[:12], "s-" + uuid.uuid4().hex
    answer(ask(test_api, f"#remember {key} durian"))
    answer(ask(test_api, "before the restart", session))
    if fleet.ray_address is None:
        pytest.skip("needs the test run's own cluster")
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "fleet-test#memory#" in a["name"]
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)

    def recalled() -> bool:  # Serve replaces the replica; until then the tool fails
        reply = ask(test_api, f"#recall qa {key}")
        if reply.status_code not in (200, 503):
            pytest.fail(reply.text)
        said = answer(reply) if reply.status_code == 200 else ""
        if said and said != "recalled: durian" and not said.startswith("recalled: error"):
            pytest.fail(said)  # an error, never a wrong answer (an assert here would be retried)
        return said == "recalled: durian"

    wait_until(recalled, timeout_s=120, interval_s=0.5)
    assert answer(ask(test_api, "after the restart", session)).endswith("earlier: before the restart")


def test_memory_use_is_reported_as_metrics(fleet: Fleet, test_api: httpx.Client) -> None:
    from tests.integration.test_observability_http import scrape, total

    if fleet.metrics_url is None:
        pytest.skip("needs the conftest's own cluster (Ray's metrics port)")
    answer(ask(test_api, f"#remember k{uuid.uuid4().hex[:12]} rambutan"))
    session = "s-" + uuid.uuid4().hex
    for turn in ("one", "two", "three"):  # the test app keeps 4 messages: turn three evicts turn one
        reply = answer(ask(test_api, turn, session))
    assert reply.endswith("earlier: two")

    def reported() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        metrics = scrape(fleet)
        assert total(metrics, "ray_fleet_memory_items", store="facts") > 0
        assert total(metrics, "ray_fleet_memory_evictions_total", store="sessions") > 0
        return metrics

    # The service reports every few seconds; Ray exports every one.
    metrics = wait_until(reported, timeout_s=60, interval_s=0.5)
    evicted = total(metrics, "ray_fleet_memory_evictions_total", store="sessions")
    assert total(metrics, "ray_fleet_memory_bytes", store="facts") > 0
    assert evicted >= 2  # the first turn's question and answer
    assert total(metrics, "ray_fleet_memory_items", store="sessions") > 0
