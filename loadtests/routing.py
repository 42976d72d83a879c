"""Routing accuracy of the orchestrator against a live fleet.

Sends each question below to ``orchestrator`` (no ``tool_choice``: the agent decides),
one at a time, and reads which delegate it called from the response's
``fleet.delegations`` (the first one counts). Prints the accuracy per delegate and
overall, latency p50 and p95, how many answers look degenerate (a stretch of text that
repeats one short unit, see :func:`repeated_stretch`) and how many were cut by
``max_tokens``; writes every answer and the summary as JSON.

    make up   # or any fleet serving configs/local.yaml
    .venv/bin/python loadtests/routing.py --base-url http://127.0.0.1:8000

The questions are written for the example agents' tools and data (the handbook's
sections, employees E1001-E1004, SKU-1001-SKU-1004, the live Serve status) and are
kept apart from the routing examples in agents/orchestrator/agent.yaml (a unit test
checks), so the figure is a held-out one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

AGENT = "orchestrator"
HR, SCM, OPS = "hr-policy-advisor", "supply-chain-optimizer", "fleet-monitor"
DELEGATES = (HR, SCM, OPS)
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Question:
    expected: str
    text: str


QUESTIONS: tuple[Question, ...] = (
    Question(HR, "How many days of leave can I carry over? My employee id is E1001."),
    Question(HR, "What is the leave balance of employee E1003?"),
    Question(HR, "I have been sick since Monday. When do I need a doctor's note?"),
    Question(HR, "How long is paid parental leave for the primary caregiver?"),
    Question(HR, "Can I work from Spain for a few weeks this summer?"),
    Question(HR, "Up to how much are meals reimbursed on a business trip?"),
    Question(HR, "Who can I talk to about discrimination at work?"),
    Question(SCM, "Should we place an order for SKU-1001 today?"),
    Question(SCM, "How many units of SKU-1002 are in the warehouse?"),
    Question(SCM, "What order quantity minimises cost for SKU-1003?"),
    Question(SCM, "How many days until we run out of SKU-1004?"),
    Question(SCM, "What safety stock do we need for SKU-1001 at a 99% service level?"),
    Question(SCM, "What is the reorder point for barcode label rolls?"),
    Question(SCM, "Are we running low on corrugated boxes?"),
    Question(OPS, "How many replicas is each deployment running right now?"),
    Question(OPS, "Is any service unhealthy at the moment?"),
    Question(OPS, "How many requests is the model deployment handling right now?"),
    Question(OPS, "Do we need to add replicas anywhere?"),
    Question(OPS, "Which deployments are at their max_replicas limit?"),
    Question(OPS, "Can we scale anything down to free up resources?"),
    Question(OPS, "What is the current status of the Ray Serve applications?"),
)


@dataclass
class Outcome:
    """One question as the fleet answered it."""

    question: str
    expected: str
    routed: str | None
    correct: bool
    latency_s: float
    status: int
    delegations: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    degenerate: str | None = None  # the repeated unit, if the answer loops
    answer: str = ""
    error: str | None = None


def repeated_stretch(
    text: str, *, max_period: int = 48, min_repeats: int = 3, min_chars: int = 24, min_symbol_chars: int = 48
) -> str | None:
    """The unit of the first stretch of ``text`` that repeats one unit of at most
    ``max_period`` characters ``min_repeats`` times or more, over ``min_chars`` characters
    (``min_symbol_chars`` for a unit without a letter or digit: a markdown rule or table
    border is no loop); ``None`` if there is none. Anywhere in the text, not only at its
    end: the engine's own repetition stop ends a reply at the loop's first 48 characters."""
    for period in range(1, max_period + 1):
        run = 0
        for i in range(period, len(text) + 1):
            if i < len(text) and text[i] == text[i - period]:
                run += 1
                continue
            stretch = run + period
            if run and stretch >= min_repeats * period:
                unit = text[i - stretch : i - stretch + period]
                needed = min_chars if any(c.isalnum() for c in unit) else min_symbol_chars
                if stretch >= needed:
                    return unit
            run = 0
    return None


def outcome(question: Question, status: int, body: Any, latency_s: float) -> Outcome:
    """Score one response (its HTTP status and JSON body)."""
    if status != 200 or not isinstance(body, dict):
        error = body.get("error") if isinstance(body, dict) else body
        message = error.get("message") if isinstance(error, dict) else error
        return Outcome(question.text, question.expected, None, False, latency_s, status, error=str(message))
    delegations = list(body.get("fleet", {}).get("delegations") or [])
    choice = (body.get("choices") or [{}])[0]
    answer = (choice.get("message") or {}).get("content") or ""
    routed = delegations[0] if delegations else None
    return Outcome(
        question.text,
        question.expected,
        routed,
        routed == question.expected,
        latency_s,
        status,
        delegations,
        choice.get("finish_reason"),
        repeated_stretch(answer),
        answer,
    )


def _rate(outcomes: list[Outcome]) -> dict[str, Any]:
    right = sum(o.correct for o in outcomes)
    return {"questions": len(outcomes), "correct": right, "accuracy": round(right / len(outcomes), 3)}


def score(outcomes: list[Outcome]) -> dict[str, Any]:
    """Accuracy per delegate and overall, latency, degenerate and cut answers, errors."""
    latencies = sorted(o.latency_s for o in outcomes)
    expected = [d for d in DELEGATES if any(o.expected == d for o in outcomes)]
    return {
        "agent": AGENT,
        "overall": _rate(outcomes),
        "per_delegate": {d: _rate([o for o in outcomes if o.expected == d]) for d in expected},
        "not_delegated": sum(o.routed is None for o in outcomes),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
        "degenerate": sum(o.degenerate is not None for o in outcomes),
        "cut_by_max_tokens": sum(o.finish_reason == "length" for o in outcomes),
        "errors": sum(o.status != 200 for o in outcomes),
    }


def ask(client: httpx.Client, question: Question, max_tokens: int | None = None) -> Outcome:
    body: dict[str, Any] = {"model": AGENT, "messages": [{"role": "user", "content": question.text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    started = time.monotonic()
    try:
        response = client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return outcome(question, 0, f"{type(exc).__name__}: {exc}", time.monotonic() - started)
    latency = time.monotonic() - started
    try:
        parsed: Any = response.json()
    except ValueError:
        parsed = response.text[:200]
    return outcome(question, response.status_code, parsed, latency)


def evaluate(
    client: httpx.Client, questions: tuple[Question, ...] = QUESTIONS, max_tokens: int | None = None
) -> list[Outcome]:
    """Every question in turn (one at a time: latency is the fleet's, not a queue's)."""
    outcomes = []
    for question in questions:
        done = ask(client, question, max_tokens)
        outcomes.append(done)
        mark = "ok  " if done.correct else "MISS"
        print(f"{mark} {done.latency_s:6.1f}s  {done.expected:24} <- {done.routed or '-':24} {question.text}")
    return outcomes


def report(summary: dict[str, Any]) -> str:
    overall = summary["overall"]
    lines = [
        f"routing accuracy ({summary['agent']}): {overall['correct']}/{overall['questions']} "
        f"= {overall['accuracy']:.0%}",
        *(
            f"  {name:24} {r['correct']}/{r['questions']} = {r['accuracy']:.0%}"
            for name, r in summary["per_delegate"].items()
        ),
        f"not delegated: {summary['not_delegated']}, errors: {summary['errors']}",
        f"latency p50 {summary['latency_p50_s']:.1f} s, p95 {summary['latency_p95_s']:.1f} s",
        f"degenerate answers: {summary['degenerate']}, cut by max_tokens: {summary['cut_by_max_tokens']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, transport: httpx.BaseTransport | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="The fleet's HTTP address.")
    parser.add_argument("--api-key", default=None, help="A tenant key, when the fleet requires keys.")
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / f"{dt.date.today().isoformat()}-routing.json",
        help="Where the JSON results go (default: loadtests/results/<date>-routing.json).",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="Per request (default: the agent's).")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds per request.")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(
        base_url=args.base_url, headers=headers, timeout=args.timeout, transport=transport
    ) as client:
        outcomes = evaluate(client, max_tokens=args.max_tokens)
    summary = score(outcomes)
    print(report(summary))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"base_url": args.base_url, "summary": summary, "outcomes": [asdict(o) for o in outcomes]}
    args.output.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
