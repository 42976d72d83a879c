"""Prometheus metrics per agent and version, exported through Ray's metrics agent.

Every Ray node serves its replicas' metrics at its metrics export port
(``ray start --metrics-export-port``; ``fleet up`` uses ``FLEET_METRICS_PORT``), with
Ray's ``ray_`` prefix: ``fleet_requests`` is scraped as ``ray_fleet_requests_total``.
Labels are bounded sets only: agent names, versions, tool names the manifest declares
(any other name the model makes up counts as ``unknown``, its status ``invalid``),
statuses, outcomes, hops. Never a prompt, a user, a request id or PII.

Requests and their latency are counted at two hops, told apart by ``hop``: ``ingress`` is the
HTTP front door's view of the agent a client named (refusals before any agent runs, and
agents that could not be reached, included); ``agent`` is each agent replica's own view
of every call it serves, a delegate's included. A sum over both hops counts a request
twice: the rules and the dashboard always pick one, or group by it.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

from ray.util.metrics import Counter, Histogram

from serve.steps import DelegationStep, ModelCallStep, Step, ToolCallStep

__all__ = ["EXPORTED", "Hop", "MetricsSink", "RequestMetrics", "Tally", "Timed", "outcome_of"]

log = logging.getLogger("fleet.metrics")

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
# Who counted a request: the ingress (the client's HTTP view) or the agent's own replica.
Hop = Literal["ingress", "agent"]

# name (as scraped) -> what it counts; the rules and the dashboard may use only these.
EXPORTED = {
    "ray_fleet_requests_total": (
        "Requests answered, by agent, version, outcome, HTTP status and hop (ingress: as the client "
        "saw it; agent: as the agent's replica did, delegated calls included)."
    ),
    "ray_fleet_request_duration_seconds": "Latency by agent, version and hop (ingress or agent) (histogram).",
    "ray_fleet_time_to_first_token_seconds": "Time to the first streamed content (histogram).",
    "ray_fleet_tokens_total": "Model tokens, by agent, version and direction (input/output).",
    "ray_fleet_model_calls_total": "Model calls by agent, version and finish reason.",
    "ray_fleet_cost_usd_total": "What model calls cost, in USD at each backend's price, by agent and version.",
    "ray_fleet_tool_calls_total": "Tool calls by agent, version, tool and status (ok/error/invalid/denied/escalated).",
    "ray_fleet_policy_decisions_total": "Policy decisions by agent, point, outcome and enforcement.",
    "ray_fleet_delegations_total": "Delegations by agent and target.",
    "ray_fleet_budget_used_ratio": (
        "What each budget has used of its current period's limit, (spent + held) / limit, by budget "
        "(tenant:acme:day, key:<tenant>:<16 hex>:month, agent:<name>:day), set by the ledger."
    ),
    "ray_fleet_memory_items": "Items the memory service holds, by store (sessions, context, facts, artifacts).",
    "ray_fleet_memory_bytes": "Bytes the memory service holds, by store.",
    "ray_fleet_memory_evictions_total": "Items evicted at the limits or by age since the service started, by store.",
    "ray_fleet_approvals_pending": "Approvals waiting for a person, by agent, set by the approvals service.",
    "ray_fleet_approvals_decided_total": (
        "Approvals decided, by agent and outcome (approved, rejected, expired: none decided in time)."
    ),
    "ray_fleet_approval_decision_seconds": (
        "Time from a call's parking to its approval's decision (expiry included), by agent (histogram)."
    ),
}


def outcome_of(status: int) -> str:
    if status < 400:
        return "success"
    if status in (401, 403):
        return "denied"
    return "client_error" if status < 500 else "error"


class _Instruments:
    """One set per process: Ray metrics are registered once by name."""

    def __init__(self) -> None:
        self.requests = Counter(
            "fleet_requests",
            EXPORTED["ray_fleet_requests_total"],
            ("agent", "version", "outcome", "status", "hop"),
        )
        self.latency = Histogram(
            "fleet_request_duration_seconds",
            EXPORTED["ray_fleet_request_duration_seconds"],
            LATENCY_BUCKETS,
            ("agent", "version", "hop"),
        )
        self.ttft = Histogram(
            "fleet_time_to_first_token_seconds",
            EXPORTED["ray_fleet_time_to_first_token_seconds"],
            LATENCY_BUCKETS,
            ("agent", "version"),
        )
        self.tokens = Counter(
            "fleet_tokens", EXPORTED["ray_fleet_tokens_total"], ("agent", "version", "direction")
        )
        self.cost = Counter("fleet_cost_usd", EXPORTED["ray_fleet_cost_usd_total"], ("agent", "version"))
        self.model_calls = Counter(
            "fleet_model_calls",
            EXPORTED["ray_fleet_model_calls_total"],
            ("agent", "version", "finish_reason"),
        )
        self.tool_calls = Counter(
            "fleet_tool_calls", EXPORTED["ray_fleet_tool_calls_total"], ("agent", "version", "tool", "status")
        )
        self.decisions = Counter(
            "fleet_policy_decisions",
            EXPORTED["ray_fleet_policy_decisions_total"],
            ("agent", "point", "outcome", "enforced"),
        )
        self.delegations = Counter(
            "fleet_delegations", EXPORTED["ray_fleet_delegations_total"], ("agent", "target")
        )


class Tally:
    """Counter increments, summed in the process and handed to Ray's counters a second later.

    A Ray counter increment costs ~8 µs, ~25 µs in a busy replica, and a delegated
    request makes a dozen (a decision, a model call, a tool call each count). Ray's agent
    exports every few seconds and Prometheus scrapes every few more, so the second is not
    seen. A process that exits normally hands on what it holds (``atexit``); one that is
    killed loses at most its last second's counts.
    """

    def __init__(self, delay_s: float = 1.0) -> None:
        self._delay = delay_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[Counter, tuple[tuple[str, str], ...]], float] = {}
        self._timer: threading.Timer | None = None
        atexit.register(self.flush)

    def inc(self, counter: Counter, value: float, tags: dict[str, str]) -> None:
        if value <= 0:  # nothing to count (Ray's counters refuse an increment of 0)
            return
        key = (counter, tuple(tags.items()))
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + value
            if self._timer is None:
                self._timer = threading.Timer(self._delay, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending, self._timer = self._pending, {}, None
        for (counter, tags), value in pending.items():
            try:
                counter.inc(value, dict(tags))
            except Exception:  # one refused count (a bad tag) must not take the others with it
                log.exception("a metric count was refused: %s %s", value, dict(tags))


_instruments: _Instruments | None = None
_tally: Tally | None = None


def tally() -> Tally:
    global _tally
    if _tally is None:
        _tally = Tally()
    return _tally


def instruments() -> _Instruments:
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


class RequestMetrics:
    """Requests and latency as one hop sees them (the ingress's: time to first token too)."""

    def __init__(self, versions: dict[str, str], hop: Hop = "ingress") -> None:
        self._versions = versions
        self._hop = hop
        self._m = instruments()
        self._tally = tally()

    def request(self, agent: str | None, status: int, seconds: float) -> None:
        name = agent if agent in self._versions else "unknown"
        version = self._versions.get(name, "unknown")
        tags = {"agent": name, "version": version, "hop": self._hop}
        self._tally.inc(self._m.requests, 1, {**tags, "outcome": outcome_of(status), "status": str(status)})
        if agent in self._versions:
            self._m.latency.observe(seconds, tags)

    def first_token(self, agent: str, seconds: float) -> None:
        self._m.ttft.observe(seconds, {"agent": agent, "version": self._versions.get(agent, "unknown")})

    def timed(self, agent: str) -> Timed:
        """A request to ``agent`` starting now; :meth:`Timed.record` counts it."""
        return Timed(self, agent)


class Timed:
    """One request as a hop counts it: its status once known, its latency up to then.

    A request that ends without a status (its caller cancelled it, or stopped reading
    its stream) counts as 499, as nginx logs a client that closed the request."""

    def __init__(self, metrics: RequestMetrics, agent: str) -> None:
        self._metrics, self._agent = metrics, agent
        self._started = time.monotonic()
        self.status: int = 499
        self._seconds: float | None = None

    def end(self, status: int) -> None:
        """The request's status is known (the first one given stands)."""
        if self._seconds is None:
            self.status, self._seconds = status, time.monotonic() - self._started

    def record(self) -> None:
        seconds = time.monotonic() - self._started if self._seconds is None else self._seconds
        self._metrics.request(self._agent, self.status, seconds)


class MetricsSink:
    """An audit sink that counts what passes through it, then hands it on."""

    def __init__(self, inner: Any, agent: str | None, version: str, tools: Iterable[str]) -> None:
        self._inner, self._agent, self._version = inner, agent, version
        self._tools = frozenset(tools)
        self._m = instruments()
        self._tally = tally()

    def append(self, record: dict[str, Any]) -> None:
        tags = {"agent": record["agent"], "point": record["point"], "outcome": record["outcome"]}
        self._tally.inc(self._m.decisions, 1, {**tags, "enforced": "true" if record["enforced"] else "false"})
        self._inner.append(record)

    def step(self, step: Step, record: dict[str, Any]) -> None:
        """Count a step by its type, then hand its record on."""
        if isinstance(step, ModelCallStep):
            version = {"agent": step.agent, "version": self._version}
            for direction, count in (
                ("input", step.prompt_tokens),
                ("output", step.completion_tokens),
            ):  # a backend may report no usage: the tally skips a count of 0
                self._tally.inc(self._m.tokens, count, {**version, "direction": direction})
            self._tally.inc(self._m.model_calls, 1, {**version, "finish_reason": step.finish_reason})
            self._tally.inc(
                self._m.cost, float(step.cost_usd), version
            )  # a gauge of money: float is Prometheus's
        elif isinstance(step, ToolCallStep):
            # A name the manifest does not declare is a tool the model made up: invalid,
            # whatever the policy then said of it (the response counts it so too).
            known = step.tool in self._tools
            tool, status = (step.tool, step.status) if known else ("unknown", "invalid")
            tags = {"agent": step.agent, "version": self._version, "tool": tool, "status": status}
            self._tally.inc(self._m.tool_calls, 1, tags)
        elif isinstance(step, DelegationStep):
            self._tally.inc(self._m.delegations, 1, {"agent": step.agent, "target": step.target})
        self._inner.event(record)
