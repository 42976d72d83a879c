"""What governance costs a request, measured against the same request without it.

In one process, no Ray (the costs are CPU in the replica, and noise from the cluster
would swamp them):
- ``decision``: one policy decision (regopy, configs/policies), per decision point, and
  through the Governor (input document, digest, audit record);
- ``pii_scan_4k``: scanning 4 KB of text for every PII kind;
- ``audit_append``: the audit log's group commit (write + fsync), per record, by batch size;
- ``request_<scenario>``: a request through the agent loop (scripted model; ``simple``:
  answered by the model alone, ``tool``: one tool call) with governance, against the
  same loop with a pass-through guard. The difference is governance's cost per request
  (the ingress decision and the agent's, their PII scans and audit hand-offs).
  ``cold``: the engine evaluates every decision; ``warm``: repeated inputs are answered
  from its memo.
Results go to ``loadtests/results/<date>-governance.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

GOALS = {"decision_p50_ms": 0.5, "governance_per_request_p50_ms": 2.0, "audit_append_amortised_ms": 0.2}


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def now(coro: Coroutine[Any, Any, Any]) -> Any:
    """A coroutine that never waits (an in-process decision) run to its end without an event
    loop: the decision's own cost, not a loop's scheduling."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine waited: not an in-process decision")


def stats(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {
        "p50_ms": round(statistics.median(ordered), 4),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 4),
        "n": len(ordered),
    }


def decisions(n: int, memo: bool) -> dict[str, Any]:
    from serve.context import Context
    from serve.governance.config import GovernanceConfig, build_engines
    from serve.governance.governor import Governor
    from serve.governance.guard import AgentGuard
    from serve.manifest import load_agent
    from serve.testing import MemorySink

    engine, _ = build_engines(GovernanceConfig(), ROOT, memo=memo)
    spec = load_agent(ROOT / "agents/hr-policy-advisor")
    guard = AgentGuard(Governor(engine, None, MemorySink()), spec)
    ctx = Context("req_bench", ("hr-policy-advisor",))
    facts = guard.facts(ctx)
    base = {"version": "fleet.policy/v1", "request": {"id": "r", "chain": []}, "agent": facts.model_dump()}
    base["principal"] = {"tenant": "acme", "roles": ["hr"], "authenticated": True, "scopes": None}
    actions: dict[str, dict[str, Any]] = {
        "ingress": {"agent": "hr-policy-advisor"},
        "model_input": {"pii": ["email"], "turn": 1},
        "model_output": {"pii": [], "turn": 1},
        "tool": {
            "tool": "leave_balance",
            "known": True,
            "scope": "hr.leave.read",
            "approval": False,
            "arguments": {"employee_id": "E1001"},
        },
        "delegation": {"target": "x", "target_scopes": []},
        "data": {"tool": "leave_balance", "classes": [], "pii": []},
    }
    out: dict[str, Any] = {}
    for point, action in actions.items():
        doc = {**base, "point": point, "action": action}
        out[point] = stats(timed(lambda doc=doc, point=point: now(engine.evaluate(point, doc)), n))
    gov = Governor(engine, None, MemorySink())
    tool = actions["tool"]
    out["governor_tool_decision"] = stats(
        timed(lambda: now(gov.decide("tool", ctx, facts, tool, "tool:x")), n)
    )
    return out


def pii_scan(n: int) -> dict[str, float]:
    from serve.policy.pii import PII_KINDS, _scan  # the scan itself, not its cache of recent texts

    paragraph = (
        "Employees accrue 25 days of annual leave; up to 5 unused days carry over to the next year. "
        "Contact people-ops@example.com or +1 415 555 0134 for questions about parental leave. "
    )
    text = (paragraph * 30)[:4096]
    kinds = frozenset(PII_KINDS)
    return stats(timed(lambda: _scan(text, kinds), n))


def audit_append(batches: int) -> dict[str, Any]:
    from serve.audit.log import AuditLog

    record = {
        "time": 1.0,
        "request_id": "req_" + "0" * 32,
        "decision_id": "dec_" + "0" * 20,
        "tenant": "acme",
        "agent": "hr-policy-advisor",
        "action": "tool:leave_balance",
        "policy": "tool.rego",
        "policy_version": "0" * 12,
        "outcome": "allow",
        "enforced": True,
        "reasons": ["tool scope held"],
        "input_digest": "0" * 64,
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (1, 8, 64):
            log = AuditLog(Path(tmp) / f"audit-{size}.jsonl", b"k" * 32)
            runs = timed(lambda size=size, log=log: log.append([dict(record) for _ in range(size)]), batches)
            out[f"batch_{size}"] = {**stats(runs), "per_record_ms": round(statistics.median(runs) / size, 4)}
            log.close()
    return out


class OpenGuard:
    """The baseline: the loop's guard with every decision skipped (benchmark only)."""

    holds_output = False

    async def model_input(self, *args: Any) -> None:
        return None

    async def model_output(self, ctx: Any, text: str, turn: int) -> str:
        return text

    async def tool(self, *args: Any) -> None:
        return None

    async def delegation(self, *args: Any) -> None:
        return None

    async def result(self, ctx: Any, name: str, text: str, classes: list[str]) -> str:
        return text

    def step(self, *args: Any) -> None:
        return None


SCRIPTS: dict[str, list[dict[str, Any]]] = {
    # a question answered from the model alone: ingress, model input, model output
    "simple": [{"content": "Employees get 25 days of annual leave; up to 5 carry over."}],
    # one tool call: ingress, model input, tool, data, model input, model output
    "tool": [
        {"tool_calls": [{"name": "leave_balance", "arguments": {"employee_id": "E1001"}}]},
        {"content": "Leave balance: {tool_result}"},
    ],
}


def request_cost(n: int, memo: bool, scenario: str) -> dict[str, Any]:
    from serve.context import Context
    from serve.governance.config import GovernanceConfig, build_engines
    from serve.governance.governor import Governor
    from serve.governance.guard import AgentGuard
    from serve.loop.runner import AgentLoop
    from serve.manifest import load_agent
    from serve.models.base import ModelChunk, ModelRequest
    from serve.models.scripted import ScriptedBackend, ScriptedConfig
    from serve.policy.schema import Principal
    from serve.protocol import ChatRequest
    from serve.testing import MemorySink
    from serve.tools import load_tools

    spec = load_agent(ROOT / "agents/hr-policy-advisor")
    tools = load_tools(spec.folder, [t.name for t in spec.manifest.tools])
    script = {"kind": "scripted", "script": [{"replies": SCRIPTS[scenario]}]}
    backend = ScriptedBackend(ScriptedConfig.model_validate(script))

    async def model(request: ModelRequest) -> AsyncIterator[ModelChunk]:
        async for piece in backend.stream(request):
            yield piece

    engine, _ = build_engines(GovernanceConfig(), ROOT, memo=memo)
    sink = MemorySink()
    governor = Governor(engine, None, sink)
    guard = AgentGuard(governor, spec)
    governed = AgentLoop(spec, tools, model, {}, guard)
    open_loop = AgentLoop(spec, tools, model, {}, OpenGuard())
    principal = Principal(tenant="acme", roles=["hr"], authenticated=True)
    chat = ChatRequest.model_validate(
        {
            "model": "hr-policy-advisor",
            "messages": [{"role": "user", "content": "How much leave does E1001 have?"}],
        }
    )

    async def measure(loop: AgentLoop, admit: bool) -> list[float]:
        out = []
        for i in range(n):
            start = time.perf_counter()
            ctx = Context.new(f"req_{i}", principal)
            if admit:  # the ingress's decision (made in the ingress replica)
                await governor.decide(
                    "ingress", ctx, guard.facts(ctx), {"agent": "hr-policy-advisor"}, "call"
                )
            await loop.run(chat, ctx.enter("hr-policy-advisor"))
            out.append((time.perf_counter() - start) * 1000)
        return out

    async def both() -> tuple[list[float], list[float]]:
        await measure(governed, True)  # warm up
        await measure(open_loop, False)
        off, on = [], []
        for _ in range(5):  # interleaved rounds: drift hits both sides alike
            off += await measure(open_loop, False)
            on += await measure(governed, True)
        return off, on

    sink.records.clear()
    off, on = asyncio.run(both())
    return {
        "off": stats(off),
        "on": stats(on),
        "governance_per_request_p50_ms": round(statistics.median(on) - statistics.median(off), 4),
        "decisions_per_request": len(sink.records) // (6 * n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="Samples per measurement.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    print("governance bench: decisions ...", flush=True)
    # cold: every decision evaluated by the engine; warm: repeated inputs come from its memo.
    result: dict[str, Any] = {
        "decision": decisions(args.n, memo=False),
        "decision_warm": decisions(args.n, memo=True),
    }
    print("governance bench: PII scan of 4 KB ...", flush=True)
    result["pii_scan_4k"] = pii_scan(args.n // 2)
    print("governance bench: audit appends ...", flush=True)
    result["audit_append"] = audit_append(max(args.n // 20, 20))
    print("governance bench: a request with and without governance ...", flush=True)
    for scenario in SCRIPTS:
        for memo in (False, True):
            name = f"request_{scenario}" + ("_warm" if memo else "")
            result[name] = request_cost(max(args.n // 10, 20), memo=memo, scenario=scenario)
    worst_decision = max(v["p50_ms"] for k, v in result["decision"].items() if k != "governor_tool_decision")
    per_request = result["request_simple"]["governance_per_request_p50_ms"]
    result["goals"] = {
        "decision_p50_ms": {"goal": GOALS["decision_p50_ms"], "measured_cold_worst_point": worst_decision},
        "governance_per_request_p50_ms": {
            "goal": GOALS["governance_per_request_p50_ms"],
            "measured_cold": per_request,
            "measured_warm": result["request_simple_warm"]["governance_per_request_p50_ms"],
            "measured_cold_plus_4k_scan": round(per_request + result["pii_scan_4k"]["p50_ms"], 4),
            "with_one_tool_call_cold": result["request_tool"]["governance_per_request_p50_ms"],
            "with_one_tool_call_warm": result["request_tool_warm"]["governance_per_request_p50_ms"],
        },
        "audit_append_amortised_ms": {
            "goal": GOALS["audit_append_amortised_ms"],
            "measured": result["audit_append"]["batch_64"]["per_record_ms"],
        },
    }
    result["python"] = sys.version.split()[0]
    out = args.out or HERE / "results" / f"{dt.date.today().isoformat()}-governance.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
