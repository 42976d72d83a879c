"""``fleet eval``: agents' suites run against a fleet over its OpenAI API.

Each case is one request (a bias case one per variant) to ``POST /v1/chat/completions``
with ``model`` = the agent, then its explanation (``GET /v1/requests/{id}/explain``),
which :mod:`serve.lifecycle.checks` reads. Cases run a few at a time; progress goes to
stderr, one line per case. The results: a summary table, a JSON file, and JUnit XML for
CI systems (a test suite per agent and kind, a test case per case).
"""

from __future__ import annotations

import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

from serve.lifecycle.checks import Observed, check_bias, check_safety, check_task
from serve.lifecycle.evals import BiasCase, EvalSuite, SafetyCase, TaskCase
from serve.models.scripted import ScriptRule

__all__ = [
    "CaseResult",
    "EvalRun",
    "FleetApi",
    "Kind",
    "junit_xml",
    "run_suites",
    "scripted_rules",
    "summary",
]

Kind = Literal["task", "safety", "bias"]
KINDS: tuple[Kind, ...] = ("task", "safety", "bias")


@dataclass(frozen=True)
class CaseResult:
    agent: str
    kind: Kind
    id: str
    passed: bool
    seconds: float
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # softer checks: reported, never failing
    request_ids: list[str] = field(default_factory=list)
    attribute: str | None = None  # a bias case's protected attribute


@dataclass
class EvalRun:
    """Every case's result, and each suite's rates against its thresholds."""

    target: str
    results: list[CaseResult]
    suites: dict[str, EvalSuite]

    def rate(self, agent: str, kind: Kind) -> float | None:
        mine = [r for r in self.results if r.agent == agent and r.kind == kind]
        return None if not mine else sum(r.passed for r in mine) / len(mine)

    def meets(self, agent: str, kind: Kind) -> bool:
        rate = self.rate(agent, kind)
        return rate is None or rate >= getattr(self.suites[agent].thresholds, kind)

    @property
    def passed(self) -> bool:
        return all(self.meets(agent, kind) for agent in self.suites for kind in KINDS)

    def parity(self, agent: str) -> dict[str, float]:
        """A bias suite's parity rate per protected attribute."""
        out: dict[str, list[bool]] = {}
        for r in self.results:
            if r.agent == agent and r.kind == "bias" and r.attribute:
                out.setdefault(r.attribute, []).append(r.passed)
        return {attribute: sum(v) / len(v) for attribute, v in sorted(out.items())}

    def as_json(self) -> dict[str, Any]:
        agents = {}
        for agent, suite in self.suites.items():
            kinds = {
                kind: {
                    "rate": self.rate(agent, kind),
                    "threshold": getattr(suite.thresholds, kind),
                    "passed": self.meets(agent, kind),
                }
                for kind in KINDS
            }
            kinds["bias"]["parity_by_attribute"] = self.parity(agent)
            agents[agent] = kinds
        return {
            "object": "eval.run",
            "target": self.target,
            "passed": self.passed,
            "agents": agents,
            "cases": [asdict(r) for r in self.results],
        }


class FleetApi:
    """A fleet's OpenAI API: one request, then its explanation."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self._max_tokens = max_tokens  # on every request, when set: a real engine's cases stay short
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def ask(self, agent: str, messages: list[dict[str, Any]], metadata: dict[str, str] | None) -> Observed:
        body: dict[str, Any] = {"model": agent, "messages": messages}
        if metadata:
            body["metadata"] = metadata
        if self._max_tokens is not None:
            body["max_tokens"] = self._max_tokens
        started = time.monotonic()
        r = self._http.post("/v1/chat/completions", json=body)
        seconds = time.monotonic() - started
        answer = _json(r)
        request_id = r.headers.get("x-fleet-request-id") or (answer.get("fleet") or {}).get("request_id")
        if r.status_code == 200:
            content = ((answer.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
            code = None
        else:
            error = answer.get("error") or {}
            content, code = str(error.get("message") or r.text), error.get("code")
        explanation = self._explanation(request_id) if request_id else {}
        return Observed(r.status_code, content, seconds, code, request_id, explanation)

    def _explanation(self, request_id: str, wait_s: float = 3.0) -> dict[str, Any]:
        """The request's report, once its outcome is in it (an ingress ships it within
        its linger, a fraction of a second)."""
        deadline, report = time.monotonic() + wait_s, {}
        while True:
            r = self._http.get(f"/v1/requests/{request_id}/explain")
            report = _json(r) if r.status_code == 200 else {}
            if report.get("outcome") is not None or time.monotonic() > deadline:
                return report
            time.sleep(0.1)


def _json(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


Progress = Callable[[CaseResult, int, int], None]


def run_suites(
    api: FleetApi,
    suites: Iterable[EvalSuite],
    *,
    scripted: bool = False,
    concurrency: int = 4,
    progress: Progress | None = None,
    target: str = "",
    kinds: Iterable[Kind] = KINDS,
) -> EvalRun:
    """Every case of ``kinds`` of every suite, ``concurrency`` at a time; results in the
    suites' order."""
    suites, kinds = list(suites), set(kinds)
    jobs: list[Callable[[], CaseResult]] = []
    for suite in suites:
        if "task" in kinds:
            jobs += [_task_job(api, suite.agent, case) for case in suite.task]
        if "safety" in kinds:
            jobs += [_safety_job(api, suite.agent, case, scripted) for case in suite.safety]
        if "bias" in kinds:
            jobs += [_bias_job(api, suite.agent, case) for case in suite.bias]
    results: list[CaseResult] = []
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for n, result in enumerate(pool.map(lambda job: job(), jobs), start=1):
            results.append(result)
            if progress is not None:
                progress(result, n, len(jobs))
    return EvalRun(target, results, {s.agent: s for s in suites})


def _task_job(api: FleetApi, agent: str, case: TaskCase) -> Callable[[], CaseResult]:
    def job() -> CaseResult:
        seen = api.ask(agent, case.chat_messages(), case.metadata)
        failures = check_task(case, agent, seen)
        return CaseResult(agent, "task", case.id, not failures, seen.seconds, failures, [], _ids(seen))

    return job


def _safety_job(api: FleetApi, agent: str, case: SafetyCase, scripted: bool) -> Callable[[], CaseResult]:
    def job() -> CaseResult:
        seen = api.ask(agent, case.chat_messages(), case.metadata)
        failures, notes = check_safety(case, seen, scripted)
        return CaseResult(agent, "safety", case.id, not failures, seen.seconds, failures, notes, _ids(seen))

    return job


def _bias_job(api: FleetApi, agent: str, case: BiasCase) -> Callable[[], CaseResult]:
    def job() -> CaseResult:
        seen = [api.ask(agent, [{"role": "user", "content": text}], case.metadata) for text in case.inputs()]
        failures = check_bias(case, agent, seen)
        ids = [i for s in seen for i in _ids(s)]
        seconds = sum(s.seconds for s in seen)
        return CaseResult(agent, "bias", case.id, not failures, seconds, failures, [], ids, case.attribute)

    return job


def _ids(seen: Observed) -> list[str]:
    return [seen.request_id] if seen.request_id else []


def print_progress(result: CaseResult, n: int, total: int) -> None:
    verdict = "pass" if result.passed else "FAIL"
    print(
        f"[{n}/{total}] {result.agent} {result.kind} {result.id}: {verdict} ({result.seconds:.2f}s)",
        file=sys.stderr,
    )
    for failure in result.failures:
        print(f"    - {failure}", file=sys.stderr)


def summary(run: EvalRun) -> str:
    """A table: per agent and kind, passed of total, the rate and the threshold."""
    rows = [("agent", "kind", "passed", "rate", "threshold", "")]
    for agent, suite in run.suites.items():
        for kind in KINDS:
            mine = [r for r in run.results if r.agent == agent and r.kind == kind]
            if not mine:
                continue
            rate = run.rate(agent, kind) or 0.0
            threshold = getattr(suite.thresholds, kind)
            passed = f"{sum(r.passed for r in mine)}/{len(mine)}"
            rows.append(
                (
                    agent,
                    kind,
                    passed,
                    f"{rate:.0%}",
                    f"{threshold:.0%}",
                    "ok" if run.meets(agent, kind) else "BELOW",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    failed = [r for r in run.results if not r.passed]
    lines += ["", *(f"FAIL {r.agent} {r.kind} {r.id}: {'; '.join(r.failures)}" for r in failed)]
    lines.append("passed" if run.passed else "a threshold was not met")
    return "\n".join(lines)


def junit_xml(run: EvalRun) -> str:
    """JUnit XML: a ``testsuite`` per agent and kind, a ``testcase`` per case."""
    root = ET.Element("testsuites", name="fleet eval")
    for agent in run.suites:
        for kind in KINDS:
            mine = [r for r in run.results if r.agent == agent and r.kind == kind]
            if not mine:
                continue
            suite = ET.SubElement(
                root,
                "testsuite",
                name=f"{agent}.{kind}",
                tests=str(len(mine)),
                failures=str(sum(not r.passed for r in mine)),
                time=f"{sum(r.seconds for r in mine):.3f}",
            )
            for r in mine:
                case = ET.SubElement(
                    suite, "testcase", classname=f"{agent}.{kind}", name=r.id, time=f"{r.seconds:.3f}"
                )
                if not r.passed:
                    failure = ET.SubElement(case, "failure", message=r.failures[0][:200])
                    failure.text = "\n".join([*r.failures, *(f"request {i}" for i in r.request_ids)])
                if r.notes:
                    ET.SubElement(case, "system-out").text = "\n".join(r.notes)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def scripted_rules(suites: Iterable[EvalSuite]) -> list[ScriptRule]:
    """The model's side of every case that scripts it, as rules for a scripted backend:
    each answers exactly its case's message (so they go first in a script, and nothing
    else matches them)."""
    rules = []
    for suite in suites:
        scripted: list[TaskCase | SafetyCase] = [*suite.task, *suite.safety]
        for case in scripted:
            if case.script is not None and case.input is not None:
                rules.append(
                    _rule(case.script_for or suite.agent, case.input, [r.model_dump() for r in case.script])
                )
        for bias in suite.bias:
            if bias.script is not None:
                for variant, text in zip(bias.variants, bias.inputs(), strict=True):
                    replies = [json.loads(_fill(json.dumps(r.model_dump()), variant)) for r in bias.script]
                    rules.append(_rule(suite.agent, text, replies))
    return rules


def _rule(agent: str, text: str, replies: list[dict[str, Any]]) -> ScriptRule:
    return ScriptRule.model_validate({"agent": agent, "match": f"^{re.escape(text)}$", "replies": replies})


def _fill(text: str, variant: dict[str, str]) -> str:
    for name, value in variant.items():
        text = text.replace("{" + name + "}", json.dumps(value)[1:-1])
    return text
