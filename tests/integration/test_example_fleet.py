"""The example fleet on the scripted model (configs/scripted.yaml) over HTTP, with the openai client."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest
import yaml

from serve.cli import serve_details
from tests.integration.conftest import ROOT, Fleet

AGENTS = ["fleet-monitor", "hr-policy-advisor", "orchestrator", "supply-chain-optimizer"]


@pytest.fixture
def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0)


def test_models_list_names_every_agent(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert sorted(m.id for m in models.data) == AGENTS
    assert {m.owned_by for m in models.data} >= {"People Operations", "Supply Chain Planning"}


def test_orchestrator_delegates_leave_question_to_hr_agent(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="orchestrator",
        messages=[{"role": "user", "content": "How many leave days does E1001 have left?"}],
    )
    answer = reply.choices[0].message.content or ""
    # E1001: 25 entitlement + 3 carried - 12 taken - 2 pending = 14, computed by the tool.
    assert '"remaining_days": 14' in answer
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    ext = reply.model_extra["fleet"]  # type: ignore[index]
    assert ext["delegations"] == ["hr-policy-advisor"]
    assert ext["agent"] == "orchestrator" and ext["agent_version"] == "1.0.0"


def test_the_request_id_is_the_servers_and_the_clients_x_request_id_is_kept_beside_it(
    api: httpx.Client,
) -> None:
    body = {"model": "orchestrator", "messages": [{"role": "user", "content": "hello"}]}
    mine = api.post("/v1/chat/completions", json=body, headers={"x-request-id": "ticket-4711"})
    ext = mine.json()["fleet"]
    assert re.fullmatch(r"req_[0-9a-f]{32}", ext["request_id"])  # 128 random bits, the server's
    assert mine.headers.get_list("x-fleet-request-id") == [ext["request_id"]]
    assert mine.headers.get_list("x-request-id") == ["ticket-4711"]  # Ray's proxy returns the client's
    assert ext["correlation_id"] == "ticket-4711"
    theirs = api.post("/v1/chat/completions", json=body)
    assert len(theirs.headers.get_list("x-request-id")) == 1  # the one Ray's proxy made
    assert theirs.json()["fleet"]["correlation_id"] == theirs.headers["x-request-id"]
    assert theirs.json()["fleet"]["request_id"] not in (ext["request_id"], theirs.headers["x-request-id"])


def test_domain_agent_runs_its_tool_server_side(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="supply-chain-optimizer",
        messages=[{"role": "user", "content": "Should we reorder SKU-1003?"}],
    )
    answer = reply.choices[0].message.content or ""
    assert '"order_now": true' in answer and '"reorder_point": 141' in answer
    assert reply.model_extra["fleet"]["tool_calls"] == 1  # type: ignore[index]


def test_streaming_delivers_chunks_then_usage_then_done(fleet: Fleet, client: openai.OpenAI) -> None:
    def streamed(agent: str) -> tuple[list[Any], str]:
        stream = client.chat.completions.create(
            model=agent,
            messages=[{"role": "user", "content": "Can I carry over unused leave?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
        return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    # The agent whose model answers streams its tokens as they are generated.
    chunks, text = streamed("hr-policy-advisor")
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert "Carry-over of leave" in text
    # The orchestrator routes the question to it and hands off: its reply, in one delta
    # (the delegate is called unary), with the delegate's tokens in the usage.
    chunks, routed = streamed("orchestrator")
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 1
    assert "Carry-over of leave" in routed
    # The raw stream ends with the OpenAI terminator.
    with httpx.stream(
        "POST",
        fleet.url + "/v1/chat/completions",
        json={"model": "orchestrator", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_fleet_monitor_reads_live_serve_status(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="orchestrator",
        messages=[{"role": "user", "content": "How many replicas does each deployment run?"}],
    )
    answer = reply.choices[0].message.content or ""
    assert reply.model_extra["fleet"]["delegations"] == ["fleet-monitor"]  # type: ignore[index]
    report = json.loads(answer.removeprefix("Fleet status: "))
    rows = {(r["application"], r["deployment"]): r for r in report}
    hr = rows[("fleet", "hr-policy-advisor")]
    assert hr["status"] == "HEALTHY" and hr["running_replicas"] >= 1
    assert hr["max_replicas"] == 4 and hr["target_ongoing_requests"] == 4
    # The monitor's own request is in flight while it reads the status.
    assert rows[("fleet", "fleet-monitor")]["ongoing_requests"] >= 1
    # Its own fleet, every deployment of it (other applications only when asked by name or '*').
    assert {app for app, _ in rows} == {"fleet"}
    assert {"ingress", "audit", "memory", "model-default"} <= {name for _, name in rows}


def test_agent_cards(api: httpx.Client) -> None:
    cards = api.get("/v1/agents").json()["data"]
    assert [c["name"] for c in cards] == AGENTS
    hr = api.get("/v1/agents/hr-policy-advisor").json()
    assert hr["role"] == "domain" and hr["version"] == "1.0.0"
    assert hr["owner"]["team"] == "People Operations"
    assert [t["name"] for t in hr["tools"]] == ["search_handbook", "leave_balance", "request_leave"]
    assert hr["tools"][1]["scope"] == "hr.leave.read" and "leave" in hr["tools"][1]["description"].lower()
    assert (hr["tools"][2]["scope"], hr["tools"][2]["approval"]) == ("hr.leave.write", True)
    assert hr["sla"] == {"p95_latency_ms": 4000, "availability": 0.995}
    assert hr["kpis"][0]["name"] == "resolution_rate"
    assert api.get("/v1/agents/orchestrator").json()["delegates"] == [
        "hr-policy-advisor",
        "supply-chain-optimizer",
        "fleet-monitor",
    ]
    missing = api.get("/v1/agents/nobody")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_each_agent_deployment_carries_its_manifest_autoscaling(fleet: Fleet) -> None:
    details = serve_details(fleet.dashboard)
    deployments = details["applications"]["fleet"]["deployments"]
    # budget: the ledger, since the example agents set budgets per day (policies.cost.per_day_usd);
    # approvals: always (hr-policy-advisor's request_leave waits for a person)
    services = ["ingress", "model-default", "audit", "memory", "budget", "approvals"]
    assert sorted(deployments) == sorted([*AGENTS, *services])
    for name in AGENTS:
        manifest = yaml.safe_load((ROOT / "agents" / name / "agent.yaml").read_text())["autoscaling"]
        config = deployments[name]["deployment_config"]
        auto = config["autoscaling_config"]
        assert auto["min_replicas"] == manifest["min_replicas"], name
        assert auto["max_replicas"] == manifest["max_replicas"], name
        if "target_ongoing_requests" in manifest:
            assert auto["target_ongoing_requests"] == manifest["target_ongoing_requests"], name
        assert config["max_ongoing_requests"] == manifest["max_ongoing_requests"], name
        assert config["max_queued_requests"] == manifest["max_ongoing_requests"], name  # one replica's worth
    # The ingress holds what its options say (512 by default), not Ray's default of 5, and
    # each proxy queues as many for it.
    ingress = deployments["ingress"]["deployment_config"]
    assert (ingress["max_ongoing_requests"], ingress["max_queued_requests"]) == (512, 512)


def test_health(api: httpx.Client) -> None:
    body = api.get("/v1/health").json()
    assert body["status"] == "ok" and body["agents"] == AGENTS
