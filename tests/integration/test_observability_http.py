"""Traces across deployments and Prometheus metrics, on the real local Ray.

Both applications export spans to one file (FLEET_TRACES_FILE, set in their
runtime_env by the conftest); Ray's metrics agent serves the replicas' metrics.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from serve.telemetry.metrics import EXPORTED
from serve.testing import wait_until
from tests.integration.conftest import QA_KEY, Fleet

CANARY = "canary_prompt_" + secrets.token_hex(4)  # one \\w+ word: the scripted echo keeps it whole


def spans_of(
    fleet: Fleet, trace_id: str, until: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """The trace's spans, once ``until`` holds (spans are exported in batches)."""
    spans = fleet.spans
    assert spans is not None

    def exported() -> list[dict[str, Any]]:
        lines = spans.read_text().splitlines() if spans.exists() else []
        found = [s for s in map(json.loads, lines) if s["context"]["trace_id"] == "0x" + trace_id]
        assert until(found), sorted(s["name"] for s in found)
        return found

    return wait_until(exported, timeout_s=30, interval_s=0.3)


def test_one_trace_across_ingress_agents_models_tools_and_delegation(fleet: Fleet) -> None:
    if fleet.spans is None:
        pytest.skip("needs the conftest's own cluster (tracing to a file)")
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    body = {
        "model": "orchestrator",
        "messages": [{"role": "user", "content": "How much leave does E1001 have left?"}],
    }
    r = httpx.post(
        fleet.url + "/v1/chat/completions",
        json=body,
        headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.headers["x-fleet-trace-id"] == trace_id == r.json()["fleet"]["trace_id"]
    spans = spans_of(
        fleet, trace_id, lambda s: len(s) >= 7
    )  # the seven below (it waited for more: 30 s a run)
    by_id = {s["context"]["span_id"]: s for s in spans}
    names = sorted(s["name"] for s in spans)
    assert names == sorted(
        [
            "POST /v1/chat/completions",
            "invoke_agent orchestrator",  # routed by words and handed off: no model call
            "execute_tool delegate_to_hr_policy_advisor",
            "invoke_agent hr-policy-advisor", "chat default", "chat default",
            "execute_tool leave_balance",
        ]
    )  # fmt: skip

    def one(name: str) -> dict[str, Any]:
        [span] = [s for s in spans if s["name"] == name]
        return span

    def parent(span: dict[str, Any]) -> str:
        return str(by_id[span["parent_id"]]["name"])

    ingress = one("POST /v1/chat/completions")
    assert ingress["parent_id"] == "0x" + client_span  # the client's traceparent
    assert parent(one("invoke_agent orchestrator")) == "POST /v1/chat/completions"
    assert parent(one("execute_tool delegate_to_hr_policy_advisor")) == "invoke_agent orchestrator"
    assert parent(one("invoke_agent hr-policy-advisor")) == "execute_tool delegate_to_hr_policy_advisor"
    assert parent(one("execute_tool leave_balance")) == "invoke_agent hr-policy-advisor"
    chats = [s for s in spans if s["name"] == "chat default"]
    assert [parent(s) for s in chats] == ["invoke_agent hr-policy-advisor"] * 2
    routed = one("invoke_agent orchestrator")["attributes"]
    assert routed["fleet.routing.choice"] == "hr-policy-advisor"
    scores = json.loads(routed["fleet.routing.scores"])
    assert max(scores, key=scores.get) == "hr-policy-advisor"
    # GenAI semantic conventions
    model = chats[0]["attributes"]
    assert model["gen_ai.operation.name"] == "chat" and model["gen_ai.request.model"] == "default"
    assert model["gen_ai.usage.input_tokens"] > 0 and "gen_ai.usage.output_tokens" in model
    tool = one("execute_tool leave_balance")["attributes"]
    assert (tool["gen_ai.operation.name"], tool["gen_ai.tool.name"], tool["gen_ai.tool.type"]) == (
        "execute_tool", "leave_balance", "function",
    )  # fmt: skip
    agent = one("invoke_agent hr-policy-advisor")["attributes"]
    assert (agent["gen_ai.operation.name"], agent["gen_ai.agent.name"]) == (
        "invoke_agent",
        "hr-policy-advisor",
    )
    assert ingress["attributes"]["http.response.status_code"] == 200


def test_a_prompt_never_reaches_spans_or_metrics(fleet: Fleet) -> None:
    if fleet.spans is None or fleet.metrics_url is None:
        pytest.skip("needs the conftest's own cluster")
    body = {"model": "tester", "messages": [{"role": "user", "content": f"#echo {CANARY}"}]}
    r = httpx.post(
        fleet.test_url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {QA_KEY}"}
    )
    trace_id = r.headers["x-fleet-trace-id"]
    spans = spans_of(fleet, trace_id, lambda s: any(x["name"] == "execute_tool echo" for x in s))
    assert any(s["name"] == "execute_tool echo" for s in spans)
    assert CANARY in r.text  # it was really in the conversation
    assert CANARY not in fleet.spans.read_text()
    assert CANARY not in httpx.get(fleet.metrics_url, timeout=30).text


def scrape(fleet: Fleet) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert fleet.metrics_url is not None
    out = {}
    for line in httpx.get(fleet.metrics_url, timeout=30).text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ([-+\w.eE]+)$", line)
        if match and match.group(1).startswith("ray_fleet_"):
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            out[(match.group(1), labels)] = float(match.group(3))
    return out


def settled(fleet: Fleet, quiet_s: float = 3.5) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The metrics once no count has changed for ``quiet_s``: a count reaches Ray a second
    after its request (serve.telemetry.metrics.Tally), and Ray exports it a second later."""
    metrics, since = scrape(fleet), time.monotonic()

    def quiet() -> bool:
        nonlocal metrics, since
        now = scrape(fleet)
        if now != metrics:
            metrics, since = now, time.monotonic()
        return time.monotonic() - since >= quiet_s

    wait_until(quiet, timeout_s=30, interval_s=0.5)
    return metrics


def total(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


def test_metrics_count_known_traffic_per_agent(fleet: Fleet) -> None:
    if fleet.metrics_url is None:
        pytest.skip("needs the conftest's own cluster (Ray's metrics port)")
    before = settled(fleet)  # earlier tests' counts may still be on their way
    headers = {"authorization": f"Bearer {QA_KEY}"}
    url = fleet.test_url + "/v1/chat/completions"
    for text in ("#fail", "#fail", "#unknown", "#echo hi", "#delegate this"):
        body = {"model": "tester", "messages": [{"role": "user", "content": text}]}
        assert httpx.post(url, json=body, headers=headers, timeout=60).status_code == 200
    streamed = {"model": "tester", "messages": [{"role": "user", "content": "hello"}], "stream": True}
    assert "[DONE]" in httpx.post(url, json=streamed, headers=headers, timeout=60).text
    denied = httpx.post(
        fleet.test_url + "/v1/chat/completions", json={"model": "tester", "messages": []}, timeout=60
    )
    assert denied.status_code == 401
    expected = {
        ("ray_fleet_tool_calls_total", (("agent", "tester"), ("tool", "fail"), ("status", "error"))): 2,
        # A made-up tool is invalid, whatever the policy then said of it.
        ("ray_fleet_tool_calls_total", (("agent", "tester"), ("tool", "unknown"), ("status", "invalid"))): 1,
        ("ray_fleet_tool_calls_total", (("agent", "tester"), ("tool", "echo"), ("status", "ok"))): 1,
        # Counted by the ingress and by the agent's own replica; the delegate counts its call too.
        ("ray_fleet_requests_total", (("agent", "tester"), ("hop", "ingress"), ("outcome", "success"), ("status", "200"))): 6,
        ("ray_fleet_requests_total", (("agent", "tester"), ("hop", "agent"), ("outcome", "success"), ("status", "200"))): 6,
        ("ray_fleet_requests_total", (("agent", "helper"), ("hop", "agent"), ("outcome", "success"), ("status", "200"))): 1,
        ("ray_fleet_request_duration_seconds_count", (("agent", "helper"), ("hop", "agent"))): 1,
        ("ray_fleet_delegations_total", (("agent", "tester"), ("target", "helper"))): 1,
        ("ray_fleet_requests_total", (("agent", "unknown"), ("hop", "ingress"), ("outcome", "denied"), ("status", "401"))): 1,
        ("ray_fleet_policy_decisions_total", (("agent", "tester"), ("point", "tool"), ("outcome", "deny"), ("enforced", "true"))): 1,
        ("ray_fleet_model_calls_total", (("agent", "tester"), ("finish_reason", "stop"))): 6,
    }  # fmt: skip

    def deltas() -> dict[Any, float]:
        after = scrape(fleet)
        return {k: total(after, k[0], **dict(k[1])) - total(before, k[0], **dict(k[1])) for k in expected}

    def arrived() -> dict[Any, float]:
        seen = deltas()
        assert all(seen[k] >= v for k, v in expected.items()), seen
        return seen

    assert wait_until(arrived, timeout_s=60, interval_s=0.5) == expected  # Ray exports every second here
    after = scrape(fleet)
    assert total(after, "ray_fleet_tokens_total", agent="tester", direction="output") > 0
    assert total(after, "ray_fleet_time_to_first_token_seconds_count", agent="tester") > 0
    exported = {re.sub(r"_(bucket|sum|count)$", "", name) for name, _ in after}
    assert set(EXPORTED) <= exported  # every metric the rules and dashboard may use
