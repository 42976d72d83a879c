"""Alerting rules and the dashboard: valid PromQL, only exported metrics, current files."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from click.testing import CliRunner

from serve.cli import main
from serve.steps import DelegationStep, ModelCallStep, OutcomeStep, Step, ToolCallStep
from serve.telemetry.alerts import RAY_SERVE_METRICS, alert_rules, dashboard, metric_names
from serve.telemetry.metrics import EXPORTED
from tests.unit.conftest import ROOT

RULES = ROOT / "configs" / "fleet-alerts.rules.yml"
DASHBOARD = ROOT / "configs" / "grafana-dashboard.json"
KNOWN = set(EXPORTED) | RAY_SERVE_METRICS


def fleet_of(config: Path = ROOT / "configs" / "local.yaml") -> tuple[dict[str, Any], float]:
    from serve.cli import _fleet_of

    return _fleet_of(config)


def specs() -> dict[str, Any]:
    return fleet_of()[0]


def test_committed_rules_and_dashboard_are_current() -> None:
    assert yaml.safe_load(RULES.read_text()) == alert_rules(*fleet_of())
    assert json.loads(DASHBOARD.read_text()) == dashboard(*fleet_of())
    result = CliRunner().invoke(main, ["alerts"])
    assert yaml.safe_load(result.output) == alert_rules(*fleet_of())


def test_rules_are_a_valid_prometheus_rules_file() -> None:
    doc = yaml.safe_load(RULES.read_text())
    names = set()
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            promql_parser.parse(rule["expr"])  # raises on invalid PromQL
            promql_parser.parse_duration(rule["for"])
            assert metric_names(rule["expr"]) <= KNOWN, rule["expr"]
            names.add((group["name"], rule["alert"]))
    agents = {s for s in specs()}
    assert {g for g, _ in names} == {f"fleet-{a}" for a in agents} | {"fleet-budgets", "fleet-approvals"}


def test_sla_targets_become_thresholds() -> None:
    by_agent = {g["name"].removeprefix("fleet-"): g["rules"] for g in alert_rules(specs())["groups"]}
    hr = {r["alert"]: r for r in by_agent["hr-policy-advisor"]}
    manifest = specs()["hr-policy-advisor"].manifest
    assert hr["FleetAgentLatencySLO"]["expr"].endswith(f"> {manifest.sla.p95_latency_ms / 1000:g}")
    assert hr["FleetAgentAvailabilitySLO"]["expr"].endswith(f"> {1 - manifest.sla.availability:.6g}")
    assert {"FleetAgentToolFailures", "FleetAgentInvalidToolCalls", "FleetAgentLatencySpike"} <= set(hr)


def test_a_budget_warns_at_the_soft_threshold_and_pages_when_spent() -> None:
    assert fleet_of()[1] == 0.8  # local.yaml keeps budgets.soft_threshold's default
    groups = {g["name"]: g["rules"] for g in yaml.safe_load(RULES.read_text())["groups"]}
    rules = {r["alert"]: r for r in groups["fleet-budgets"]}
    near, spent = rules["FleetBudgetNearlySpent"], rules["FleetBudgetSpent"]
    assert near["expr"] == "max by (budget) (ray_fleet_budget_used_ratio) >= 0.8"
    assert (near["labels"]["severity"], near["for"]) == ("warning", "2m")
    assert "{{ $labels.budget }}" in near["annotations"]["summary"]
    assert spent["expr"] == "max by (budget) (ray_fleet_budget_used_ratio) >= 1"
    assert (spent["labels"]["severity"], spent["for"]) == ("critical", "1m")


def test_the_soft_threshold_comes_from_the_deploy_config(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["applications"][0]["args"].setdefault("budgets", {})["soft_threshold"] = 0.65
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["alerts", "--config", str(path)])
    rules = {r["alert"]: r for g in yaml.safe_load(result.output)["groups"] for r in g["rules"]}
    assert rules["FleetBudgetNearlySpent"]["expr"].endswith(">= 0.65")
    assert "(soft threshold 65%)" in rules["FleetBudgetNearlySpent"]["annotations"]["summary"]
    result = CliRunner().invoke(main, ["dashboard", "--config", str(path)])
    panel = json.loads(result.output)["panels"][-1]
    assert [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, 0.65, 1]


def test_the_dashboard_shows_each_budgets_used_ratio_against_the_threshold() -> None:
    panel = json.loads(DASHBOARD.read_text())["panels"][-1]
    assert panel["title"] == "Budgets: used of limit (spent + held; soft threshold 80%)"
    assert panel["targets"] == [
        {"refId": "A", "expr": "max by (budget) (ray_fleet_budget_used_ratio)", "legendFormat": "{{budget}}"}
    ]
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    assert defaults["custom"] == {"thresholdsStyle": {"mode": "line"}}
    assert [s["value"] for s in defaults["thresholds"]["steps"]] == [None, 0.8, 1]


def test_approvals_pending_an_hour_on_end_warn_per_agent() -> None:
    from serve.approvals.config import ApprovalsConfig
    from serve.telemetry.alerts import APPROVALS_ALERT_AFTER_S

    assert fleet_of()[2] == ApprovalsConfig().alert_after_s == APPROVALS_ALERT_AFTER_S == 3600
    groups = {g["name"]: g["rules"] for g in yaml.safe_load(RULES.read_text())["groups"]}
    [waiting] = groups["fleet-approvals"]
    assert waiting["alert"] == "FleetApprovalsWaiting"
    assert waiting["expr"] == "max by (agent) (ray_fleet_approvals_pending) > 0"
    assert (waiting["labels"], waiting["for"]) == ({"severity": "warning"}, "1h")
    assert "{{ $labels.agent }}" in waiting["annotations"]["summary"]
    assert "over 1h" in waiting["annotations"]["summary"]


@pytest.mark.parametrize(("seconds", "wait"), [(5400, "90m"), (172_800, "2d"), (90, "90s"), (600.4, "10m")])
def test_the_approvals_wait_comes_from_the_deploy_config(tmp_path: Path, seconds: float, wait: str) -> None:
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["applications"][0]["args"].setdefault("approvals", {})["alert_after_s"] = seconds
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["alerts", "--config", str(path)])
    rules = {r["alert"]: r for g in yaml.safe_load(result.output)["groups"] for r in g["rules"]}
    assert rules["FleetApprovalsWaiting"]["for"] == wait
    promql_parser.parse_duration(wait)
    assert f"over {wait}" in rules["FleetApprovalsWaiting"]["annotations"]["summary"]
    result = CliRunner().invoke(main, ["dashboard", "--config", str(path)])
    [panel] = [p for p in json.loads(result.output)["panels"] if p["title"].startswith("Approvals: time")]
    assert [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, seconds]


def test_an_approvals_wait_under_a_minute_is_refused(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["applications"][0]["args"]["approvals"] = {"alert_after_s": 30}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["alerts", "--config", str(path)])
    assert result.exit_code != 0
    assert "alert_after_s" in str(result.exception)


def test_the_dashboard_shows_pending_approvals_and_time_to_decision() -> None:
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    pending = panels["Approvals pending by agent"]
    assert pending["targets"] == [
        {
            "refId": "A",
            "expr": 'max by (agent) (ray_fleet_approvals_pending{agent=~"$agent"})',
            "legendFormat": "{{agent}}",
        }
    ]
    assert pending["fieldConfig"]["defaults"]["unit"] == "short"
    decision = panels["Approvals: time to decision p50 / p95 (alert when pending over 1h)"]
    bucket = 'rate(ray_fleet_approval_decision_seconds_bucket{agent=~"$agent"}[1h])'
    assert [(t["expr"], t["legendFormat"]) for t in decision["targets"]] == [
        (f"histogram_quantile(0.5, sum by (agent, le) ({bucket}))", "{{agent}} p50"),
        (f"histogram_quantile(0.95, sum by (agent, le) ({bucket}))", "{{agent}} p95"),
    ]
    defaults = decision["fieldConfig"]["defaults"]
    assert defaults["unit"] == "s"
    assert [s["value"] for s in defaults["thresholds"]["steps"]] == [None, 3600]
    ids = [p["id"] for p in panels.values()]
    assert len(set(ids)) == len(ids)
    positions = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels.values()]
    assert len(set(positions)) == len(positions)  # no panel drawn over another


def test_the_approvals_service_registers_exported_metrics(tmp_path: Path) -> None:
    """Its Ray metrics are scraped with ``ray_`` (and a counter's ``_total``): EXPORTED's names."""
    from serve.approvals.config import ApprovalsConfig
    from serve.approvals.service import ApprovalsService
    from serve.governance.config import GovernanceConfig

    service = ApprovalsService(
        str(tmp_path / "approvals.db"), ApprovalsConfig(), {}, GovernanceConfig(), str(ROOT), None
    )
    made = {
        f"ray_{m.info['name']}" + ("_total" if kind == "counter" else ""): (kind, m.info)
        for kind, m in (
            ("gauge", service._pending),
            ("counter", service._decided),
            ("histogram", service._latency),
        )
    }
    assert set(made) == {
        "ray_fleet_approvals_pending",
        "ray_fleet_approvals_decided_total",
        "ray_fleet_approval_decision_seconds",
    }
    for name, (_, info) in made.items():
        assert info["description"] == EXPORTED[name]
        assert set(info["tag_keys"]) <= {"agent", "outcome"}  # bounded labels only


def test_dashboard_queries_parse_and_use_exported_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert len(doc["panels"]) >= 9
    for expr in exprs:
        promql_parser.parse(expr.replace("$agent", ".*"))
        assert metric_names(expr) <= KNOWN, expr
    used = set().union(*(metric_names(e) for e in exprs))
    assert {
        "ray_fleet_requests_total",
        "ray_fleet_tool_calls_total",
        "ray_fleet_policy_decisions_total",
        "ray_fleet_budget_used_ratio",
        "ray_fleet_approvals_pending",
        "ray_fleet_approval_decision_seconds",
    } <= used
    assert "ray_serve_deployment_replica_healthy" in used


def test_a_model_call_without_usage_is_counted_and_handed_on(caplog: pytest.LogCaptureFixture) -> None:
    """A backend that reports no tokens (an upstream without streamed usage) fails nothing."""
    from serve.telemetry.metrics import MetricsSink
    from serve.testing import MemorySink

    inner = MemorySink()
    sink = MetricsSink(inner, "tester", "1.0.0", [])
    call = ModelCallStep("tester", 1, 0, 0, 0, "stop")
    sink.step(call, call.record(1.0, "r1", "acme"))
    assert inner.events == [call.record(1.0, "r1", "acme")]
    from serve.telemetry.metrics import tally

    with caplog.at_level(logging.ERROR, logger="fleet.metrics"):
        tally().flush()  # what reaches Ray's counters now: a count Ray refused would be logged
    assert not caplog.records


def test_steps_are_counted_by_their_type_and_handed_on_as_records() -> None:
    from serve.telemetry.metrics import MetricsSink
    from serve.testing import MemorySink

    counted: list[tuple[Any, float, dict[str, str]]] = []

    class Recording:
        def inc(self, counter: Any, value: float, tags: dict[str, str]) -> None:
            counted.append((counter, value, tags))

    inner = MemorySink()
    sink = MetricsSink(inner, "tester", "1.0.0", ["lookup"])
    sink._tally = Recording()  # type: ignore[assignment]
    steps: list[Step] = [
        ModelCallStep("tester", 1, 5, 2, 1, "tool_calls", Decimal("0.0012")),
        ToolCallStep("tester", "lookup", "ok", 0.1),
        ToolCallStep("tester", "made_up", "invalid", 0.0),  # a name the manifest does not declare
        ToolCallStep("tester", "made_up", "denied", 0.0),  # made up, then refused by a policy: still invalid
        ToolCallStep("tester", "lookup", "denied", 0.0),  # a declared tool the policy refused
        DelegationStep("tester", "helper"),
        OutcomeStep(200, finish_reason="stop"),  # the ingress's: recorded, not counted here
    ]
    for i, step in enumerate(steps):
        sink.step(step, step.record(float(i), "r1", "acme"))
    m, version = sink._m, {"agent": "tester", "version": "1.0.0"}
    assert counted == [
        (m.tokens, 5, {**version, "direction": "input"}),
        (m.tokens, 2, {**version, "direction": "output"}),
        (m.model_calls, 1, {**version, "finish_reason": "tool_calls"}),
        (m.cost, 0.0012, version),
        (m.tool_calls, 1, {**version, "tool": "lookup", "status": "ok"}),
        (m.tool_calls, 1, {**version, "tool": "unknown", "status": "invalid"}),
        (m.tool_calls, 1, {**version, "tool": "unknown", "status": "invalid"}),
        (m.tool_calls, 1, {**version, "tool": "lookup", "status": "denied"}),
        (m.delegations, 1, {"agent": "tester", "target": "helper"}),
    ]
    assert [e["kind"] for e in inner.events] == [
        "model_call",
        "tool_call",
        "tool_call",
        "tool_call",
        "tool_call",
        "delegation",
        "outcome",
    ]


class Observed:
    """Stands in for the request tally and the latency histogram: the tags each got."""

    def __init__(self) -> None:
        self.counts: list[dict[str, str]] = []
        self.latencies: list[dict[str, str]] = []

    def inc(self, counter: Any, value: float, tags: dict[str, str]) -> None:
        self.counts.append(tags)

    def observe(self, seconds: float, tags: dict[str, str]) -> None:
        self.latencies.append(tags)


def observed(metrics: Any) -> Observed:
    from types import SimpleNamespace

    seen = Observed()
    metrics._tally, metrics._m = seen, SimpleNamespace(requests="requests", latency=seen)
    return seen


@pytest.mark.parametrize("hop", ["ingress", "agent"])
def test_requests_are_counted_per_agent_version_and_hop(hop: Any) -> None:
    from serve.telemetry.metrics import RequestMetrics

    metrics = RequestMetrics({"tester": "1.2.0"}, hop=hop)
    seen = observed(metrics)
    metrics.request("tester", 503, 0.2)
    metrics.request("nobody", 404, 0.1)  # a name no agent has: bounded, and no latency
    assert seen.counts == [
        {"agent": "tester", "version": "1.2.0", "hop": hop, "outcome": "error", "status": "503"},
        {"agent": "unknown", "version": "unknown", "hop": hop, "outcome": "client_error", "status": "404"},
    ]
    assert seen.latencies == [{"agent": "tester", "version": "1.2.0", "hop": hop}]


def test_a_timed_request_keeps_its_first_status_and_without_one_is_499() -> None:
    from serve.telemetry.metrics import RequestMetrics

    metrics = RequestMetrics({"tester": "1.0.0"}, hop="agent")
    seen = observed(metrics)
    timed = metrics.timed("tester")
    timed.end(200)
    timed.end(500)  # a later failure (the stream's consumer gone) does not change what was answered
    timed.record()
    metrics.timed("tester").record()  # its caller gave up before any answer
    assert [c["status"] for c in seen.counts] == ["200", "499"]


REQUEST_METRICS = ("ray_fleet_requests_total", "ray_fleet_request_duration_seconds_bucket")


def test_no_rule_or_panel_sums_requests_over_both_hops() -> None:
    """Every request is counted at the ingress and at its agent: a rule picks one view, or groups by it."""
    rules = [r["expr"] for g in alert_rules(specs())["groups"] for r in g["rules"]]
    panels = [t["expr"] for p in dashboard(specs())["panels"] for t in p["targets"]]
    for expr in rules + panels:
        for part in re.split(r"\bor\b", expr):
            if any(name in part for name in REQUEST_METRICS):
                assert 'hop="' in part or "by (agent, hop" in part, part
    by_agent = {
        g["name"].removeprefix("fleet-"): {r["alert"]: r["expr"] for r in g["rules"]}
        for g in alert_rules(specs())["groups"]
    }
    hr = by_agent["hr-policy-advisor"]  # a domain agent: reached through the orchestrator
    assert 'hop="agent"' in hr["FleetAgentLatencySLO"] and 'hop="agent"' in hr["FleetAgentLatencySpike"]
    assert (
        'hop="agent"' in hr["FleetAgentAvailabilitySLO"]
        and 'hop="ingress"' in hr["FleetAgentAvailabilitySLO"]
    )


class RecordingCounter:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str]]] = []
        self.done = threading.Event()

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append((value, tags))
        self.done.set()


def test_the_tally_sums_increments_and_hands_them_on_by_itself() -> None:
    from serve.telemetry.metrics import Tally

    counter = RecordingCounter()
    tally = Tally(delay_s=0.05)
    for _ in range(3):
        tally.inc(counter, 1, {"agent": "a", "point": "tool"})  # type: ignore[arg-type]
    tally.inc(counter, 5, {"agent": "b", "point": "tool"})  # type: ignore[arg-type]
    tally.inc(counter, 0, {"agent": "c", "point": "tool"})  # type: ignore[arg-type]  # Ray refuses 0
    assert counter.calls == []  # nothing reaches Ray per increment
    assert counter.done.wait(10)  # the timer flushed without another increment
    time.sleep(0.05)
    assert sorted(counter.calls, key=lambda c: c[0]) == [
        (3, {"agent": "a", "point": "tool"}),
        (5, {"agent": "b", "point": "tool"}),
    ]
    counter.calls.clear()
    tally.inc(counter, 2, {"agent": "a", "point": "tool"})  # type: ignore[arg-type]
    tally.flush()
    assert counter.calls == [(2, {"agent": "a", "point": "tool"})]  # a new second starts from zero


class RefusingCounter(RecordingCounter):
    def inc(self, value: float, tags: dict[str, str]) -> None:
        raise ValueError("Missing value for tag key(s): version.")


def test_a_count_ray_refuses_is_logged_and_the_others_still_land(caplog: pytest.LogCaptureFixture) -> None:
    from serve.telemetry.metrics import Tally

    refusing, counter = RefusingCounter(), RecordingCounter()
    tally = Tally(delay_s=3600)
    tally.inc(refusing, 1, {"agent": "a"})  # type: ignore[arg-type]
    tally.inc(counter, 1, {"agent": "b"})  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="fleet.metrics"):
        tally.flush()
    assert counter.calls == [(1, {"agent": "b"})]
    assert "refused" in caplog.text
