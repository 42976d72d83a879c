"""Prometheus alerting rules and a Grafana dashboard, generated from the agents' manifests.

``fleet alerts`` turns each agent's ``sla`` into rules (p95 latency, availability) and adds
the quality rules every agent gets (tool-failure rate, invalid-tool-call rate, latency
spikes against the agent's own last hour). Latency is the agent's own (``hop="agent"``:
every call it serves, a delegate's included); availability fails on either view, the
agent's or the ingress's (which also sees an agent whose replicas could not be reached).
A fleet-wide group warns when a budget's used fraction (``ray_fleet_budget_used_ratio``)
passes the deploy config's ``budgets.soft_threshold``, and pages when it is all used;
another warns when an agent's approvals have waited for a person longer than
``approvals.alert_after_s`` (pending without a break: the gauge never fell to zero).
``fleet dashboard`` writes the fleet view.
Both use only metrics Fleet exports (:data:`serve.telemetry.metrics.EXPORTED`) and Ray Serve's
replica gauge.
"""

from __future__ import annotations

import re
from typing import Any

from serve.manifest import AgentSpec

__all__ = ["RAY_SERVE_METRICS", "alert_rules", "dashboard", "metric_names"]

RAY_SERVE_METRICS = {"ray_serve_deployment_replica_healthy"}
TOOL_FAILURE_RATE = 0.10  # of tool calls, over 10 minutes
INVALID_TOOL_CALL_RATE = 0.05  # unknown tools or arguments that fail the schema
SOFT_THRESHOLD = 0.8  # budgets.soft_threshold's default
# One series per budget: the ledger's one replica sets it (two, briefly, if it moved).
USED_RATIO = "max by (budget) (ray_fleet_budget_used_ratio)"
APPROVALS_ALERT_AFTER_S = 3600.0  # approvals.alert_after_s's default
# One series per agent, set by the approvals service's one replica (as the ledger's).
PENDING = "max by (agent) (ray_fleet_approvals_pending)"


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (a histogram's series map to its name)."""
    names = set(re.findall(r"\b(ray_[a-z_]+)\b", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def _rate(metric: str, agent: str, extra: str = "", window: str = "10m") -> str:
    return f'sum(rate({metric}{{agent="{agent}"{extra}}}[{window}]))'


def _p(quantile: float, agent: str, window: str) -> str:
    series = f'rate(ray_fleet_request_duration_seconds_bucket{{agent="{agent}",hop="agent"}}[{window}])'
    return f"histogram_quantile({quantile}, sum by (le) ({series}))"


def _error_ratio(agent: str, hop: str) -> str:
    total = _rate("ray_fleet_requests_total", agent, f',hop="{hop}"', window="30m")
    errors = _rate("ray_fleet_requests_total", agent, f',hop="{hop}",outcome="error"', window="30m")
    return f"({errors} / {total})"


def _rule(
    alert: str, expr: str, wait: str, labels: dict[str, str], severity: str, summary: str
) -> dict[str, Any]:
    return {
        "alert": alert,
        "expr": expr,
        "for": wait,
        "labels": {**labels, "severity": severity},
        "annotations": {"summary": summary},
    }


def _agent_rules(spec: AgentSpec) -> list[dict[str, Any]]:
    m = spec.manifest
    name, labels = m.name, {"agent": m.name, "team": m.owner.team}
    tools = _rate("ray_fleet_tool_calls_total", name)

    def tool_share(status: str) -> str:
        return (
            f"({_rate('ray_fleet_tool_calls_total', name, f',status={chr(34)}{status}{chr(34)}')} / {tools})"
        )

    sla = m.sla
    budget = f"{1 - sla.availability:.6g}"
    availability = f"{_error_ratio(name, 'agent')} > {budget} or {_error_ratio(name, 'ingress')} > {budget}"
    return [
        _rule(
            "FleetAgentLatencySLO", f"{_p(0.95, name, '5m')} > {sla.p95_latency_ms / 1000:g}", "5m", labels,
            "warning", f"{name}: p95 latency above its SLA of {sla.p95_latency_ms} ms",
        ),
        _rule(
            "FleetAgentAvailabilitySLO", availability, "10m", labels,
            "critical", f"{name}: error rate above its availability target of {sla.availability:g}",
        ),
        _rule(
            "FleetAgentToolFailures", f"{tool_share('error')} > {TOOL_FAILURE_RATE:g}", "10m", labels,
            "warning", f"{name}: more than {TOOL_FAILURE_RATE:.0%} of tool calls fail",
        ),
        _rule(
            "FleetAgentInvalidToolCalls", f"{tool_share('invalid')} > {INVALID_TOOL_CALL_RATE:g}", "10m", labels,
            "warning", f"{name}: the model calls unknown tools or bad arguments (hallucinated tool use)",
        ),
        _rule(
            "FleetAgentLatencySpike", f"{_p(0.5, name, '5m')} > 2 * {_p(0.5, name, '1h')}", "5m", labels,
            "warning", f"{name}: p50 latency doubled against its last hour",
        ),
    ]  # fmt: skip


def _budget_rules(soft_threshold: float) -> list[dict[str, Any]]:
    # {{ $labels.budget }} is filled in by Prometheus: one alert per budget.
    return [
        _rule(
            "FleetBudgetNearlySpent", f"{USED_RATIO} >= {soft_threshold:g}", "2m", {}, "warning",
            f"{{{{ $labels.budget }}}}: {{{{ $value | humanizePercentage }}}} of its limit spent or held "
            f"(soft threshold {soft_threshold:.0%})",
        ),
        _rule(
            "FleetBudgetSpent", f"{USED_RATIO} >= 1", "1m", {}, "critical",
            "{{ $labels.budget }}: its limit is spent; calls that count toward it get 402 until it resets",
        ),
    ]  # fmt: skip


def _duration(seconds: float) -> str:
    """Seconds as a Prometheus duration in its largest whole unit: 3600 -> 1h, 5400 -> 90m."""
    whole = max(round(seconds), 1)
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def _approval_rules(alert_after_s: float) -> list[dict[str, Any]]:
    # The gauge counts what is pending now, not how old it is: "pending for an hour" is
    # an agent whose approvals never all got decided in that hour.
    wait = _duration(alert_after_s)
    return [
        _rule(
            "FleetApprovalsWaiting", f"{PENDING} > 0", wait, {}, "warning",
            f"{{{{ $labels.agent }}}}: approvals have waited for a person for over {wait} "
            "({{ $value }} pending now; see `fleet approvals list`)",
        ),
    ]  # fmt: skip


def alert_rules(
    specs: dict[str, AgentSpec],
    soft_threshold: float = SOFT_THRESHOLD,
    approvals_alert_after_s: float = APPROVALS_ALERT_AFTER_S,
) -> dict[str, Any]:
    """A Prometheus rules file: one group per agent, the budgets' group and the approvals'."""
    groups = [{"name": f"fleet-{n}", "rules": _agent_rules(specs[n])} for n in sorted(specs)]
    return {
        "groups": [
            *groups,
            {"name": "fleet-budgets", "rules": _budget_rules(soft_threshold)},
            {"name": "fleet-approvals", "rules": _approval_rules(approvals_alert_after_s)},
        ]
    }


def _panel(
    pid: int, title: str, exprs: list[tuple[str, str]], unit: str, x: int, y: int, **defaults: Any
) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, **defaults}, "overrides": []},
        "targets": [
            {"refId": chr(65 + i), "expr": e, "legendFormat": legend} for i, (e, legend) in enumerate(exprs)
        ],
    }


PANELS: list[tuple[str, list[tuple[str, str]], str]] = [
    ("Requests by agent (delegated included)", [('sum by (agent) (rate(ray_fleet_requests_total{agent=~"$agent",hop="agent"}[5m]))', "{{agent}}")], "reqps"),
    (
        "Errors and denials (at the ingress, at the agent)",
        [('sum by (agent, hop, outcome) (rate(ray_fleet_requests_total{agent=~"$agent",outcome!="success"}[5m]))', "{{agent}} {{hop}} {{outcome}}")],
        "reqps",
    ),
    (
        "Latency p50 / p95 (at the ingress, at the agent)",
        [
            ('histogram_quantile(0.5, sum by (agent, hop, le) (rate(ray_fleet_request_duration_seconds_bucket{agent=~"$agent"}[5m])))', "{{agent}} {{hop}} p50"),
            ('histogram_quantile(0.95, sum by (agent, hop, le) (rate(ray_fleet_request_duration_seconds_bucket{agent=~"$agent"}[5m])))', "{{agent}} {{hop}} p95"),
        ],
        "s",
    ),
    (
        "Time to first token p50",
        [('histogram_quantile(0.5, sum by (agent, le) (rate(ray_fleet_time_to_first_token_seconds_bucket{agent=~"$agent"}[5m])))', "{{agent}}")],
        "s",
    ),
    ("Tokens", [('sum by (agent, direction) (rate(ray_fleet_tokens_total{agent=~"$agent"}[5m]))', "{{agent}} {{direction}}")], "short"),
    (
        "Tool calls by status",
        [('sum by (agent, status) (rate(ray_fleet_tool_calls_total{agent=~"$agent"}[5m]))', "{{agent}} {{status}}")],
        "reqps",
    ),
    ("Shared memory (bytes by store)", [("sum by (store) (ray_fleet_memory_bytes)", "{{store}}")], "bytes"),
    (
        "Policy decisions (not allow)",
        [('sum by (agent, point, outcome) (rate(ray_fleet_policy_decisions_total{agent=~"$agent",outcome!="allow"}[5m]))', "{{agent}} {{point}} {{outcome}}")],
        "reqps",
    ),
    ("Delegations", [('sum by (agent, target) (rate(ray_fleet_delegations_total{agent=~"$agent"}[5m]))', "{{agent}} -> {{target}}")], "reqps"),
    ("Model calls by finish reason", [('sum by (agent, finish_reason) (rate(ray_fleet_model_calls_total{agent=~"$agent"}[5m]))', "{{agent}} {{finish_reason}}")], "reqps"),
    ("Healthy replicas", [('sum by (deployment) (ray_serve_deployment_replica_healthy{deployment=~"$agent"})', "{{deployment}}")], "short"),
    ("Approvals pending by agent", [('max by (agent) (ray_fleet_approvals_pending{agent=~"$agent"})', "{{agent}}")], "short"),
]  # fmt: skip


def _budget_panel(pid: int, x: int, y: int, soft_threshold: float) -> dict[str, Any]:
    """Used fraction per budget, the soft threshold and the limit drawn as lines."""
    steps = [
        {"color": "green", "value": None},
        {"color": "orange", "value": soft_threshold},
        {"color": "red", "value": 1},
    ]
    return _panel(
        pid, f"Budgets: used of limit (spent + held; soft threshold {soft_threshold:.0%})",
        [(USED_RATIO, "{{budget}}")], "percentunit", x, y,
        thresholds={"mode": "absolute", "steps": steps},
        custom={"thresholdsStyle": {"mode": "line"}},
    )  # fmt: skip


def _decision(quantile: float) -> str:
    # Over an hour: people decide in minutes or hours, and a 5m window is mostly empty.
    series = 'rate(ray_fleet_approval_decision_seconds_bucket{agent=~"$agent"}[1h])'
    return f"histogram_quantile({quantile:g}, sum by (agent, le) ({series}))"


def _decision_panel(pid: int, x: int, y: int, alert_after_s: float) -> dict[str, Any]:
    """Time from parking to decision (expiries included), with the waiting alert's line."""
    steps = [{"color": "green", "value": None}, {"color": "orange", "value": alert_after_s}]
    return _panel(
        pid, f"Approvals: time to decision p50 / p95 (alert when pending over {_duration(alert_after_s)})",
        [(_decision(0.5), "{{agent}} p50"), (_decision(0.95), "{{agent}} p95")], "s", x, y,
        thresholds={"mode": "absolute", "steps": steps},
        custom={"thresholdsStyle": {"mode": "line"}},
    )  # fmt: skip


def dashboard(
    specs: dict[str, AgentSpec],
    soft_threshold: float = SOFT_THRESHOLD,
    approvals_alert_after_s: float = APPROVALS_ALERT_AFTER_S,
) -> dict[str, Any]:
    """A Grafana dashboard of the fleet, with an agent selector."""
    panels = [_panel(i + 1, t, e, u, 12 * (i % 2), 8 * (i // 2)) for i, (t, e, u) in enumerate(PANELS)]
    n = len(panels)
    panels.append(_decision_panel(n + 1, 12 * (n % 2), 8 * (n // 2), approvals_alert_after_s))
    n = len(panels)
    panels.append(_budget_panel(n + 1, 12 * (n % 2), 8 * (n // 2), soft_threshold))
    return {
        "title": "Fleet",
        "uid": "fleet-agents",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "tags": ["fleet", "ray-serve"],
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "agent",
                    "type": "custom",
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "query": ",".join(sorted(specs)),
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": panels,
    }
