"""loadtests/routing.py without a fleet: its questions, its degenerate-answer check and
its scoring, on canned responses (an httpx mock transport: no network)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve.manifest import load_agent
from tests.unit.conftest import AGENTS, ROOT


def routing_eval() -> Any:
    spec = importlib.util.spec_from_file_location("routing_eval", ROOT / "loadtests/routing.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


r = routing_eval()


def test_seven_questions_at_least_for_each_delegate_none_of_them_a_routing_example() -> None:
    manifest = load_agent(AGENTS / "orchestrator").manifest
    assert set(r.DELEGATES) == set(manifest.delegates)
    for delegate in r.DELEGATES:
        assert sum(q.expected == delegate for q in r.QUESTIONS) >= 7, delegate
    texts = [q.text.lower() for q in r.QUESTIONS]
    assert len(set(texts)) == len(texts) >= 21
    assert manifest.routing is not None
    assert not set(texts) & {e.question.lower() for e in manifest.routing.examples}  # held out


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("2023-08-22 12:32:53.143.14.14.14.14.14.14.14.14.14", ".14"),  # issue 17's answer
        (
            "Sure. Paris is the capital. Paris is the capital. Paris is the capital. Bye.",
            ". Paris is the capital",  # from where the stretch starts: the "." before repeats too
        ),
        ("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", "z"),
    ],
)
def test_a_looping_answer_is_degenerate(text: str, unit: str) -> None:
    assert r.repeated_stretch(text) == unit


@pytest.mark.parametrize(
    "text",
    [
        "You can carry over up to 5 unused days; they expire on 31 March.",
        "| sku | on hand |\n| --- | --- | --- | --- | --- |\n| SKU-1001 | 420 |",  # a border, no loop
        "Reorder SKU-1001 now: 1,000,000 units? No: 120.",
        "",
    ],
)
def test_an_ordinary_answer_is_not(text: str) -> None:
    assert r.repeated_stretch(text) is None


def completion(delegations: list[str], content: str, finish: str = "stop") -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        ],
        "fleet": {"agent": "orchestrator", "delegations": delegations},
    }


def test_a_response_is_scored_by_its_first_delegation() -> None:
    hr = r.Question(r.HR, "Leave?")
    right = r.outcome(hr, 200, completion([r.HR, r.SCM], "You have 14 days."), 1.5)
    assert (right.routed, right.correct, right.degenerate, right.answer) == (
        r.HR,
        True,
        None,
        "You have 14 days.",
    )
    wrong = r.outcome(hr, 200, completion([r.OPS], "x"), 1.0)
    assert (wrong.routed, wrong.correct) == (r.OPS, False)
    alone = r.outcome(hr, 200, completion([], "1.14.14.14.14.14.14.14.14.14", "length"), 1.0)
    assert (alone.routed, alone.correct, alone.degenerate, alone.finish_reason) == (
        None,
        False,
        ".14",
        "length",
    )
    failed = r.outcome(hr, 503, {"error": {"message": "overloaded", "type": "server_error"}}, 0.1)
    assert (failed.correct, failed.status, failed.error) == (False, 503, "overloaded")


def test_the_summary_counts_per_delegate_and_overall() -> None:
    outcomes = [
        r.outcome(r.Question(r.HR, "a"), 200, completion([r.HR], "ok"), 1.0),
        r.outcome(r.Question(r.HR, "b"), 200, completion([], "ok.ok.ok.ok.ok.ok.ok.ok.ok.ok"), 3.0),
        r.outcome(r.Question(r.SCM, "c"), 200, completion([r.SCM], "ok", "length"), 2.0),
        r.outcome(r.Question(r.OPS, "d"), 504, {"error": {"message": "timed out"}}, 9.0),
    ]
    summary = r.score(outcomes)
    assert summary["overall"] == {"questions": 4, "correct": 2, "accuracy": 0.5}
    assert summary["per_delegate"][r.HR] == {"questions": 2, "correct": 1, "accuracy": 0.5}
    assert (
        summary["per_delegate"][r.SCM]["accuracy"] == 1.0 and summary["per_delegate"][r.OPS]["accuracy"] == 0
    )
    assert (summary["latency_p50_s"], summary["latency_p95_s"]) == (2.5, 9.0)
    assert (summary["degenerate"], summary["cut_by_max_tokens"], summary["errors"]) == (1, 1, 1)
    assert summary["not_delegated"] == 2
    assert "routing accuracy (orchestrator): 2/4 = 50%" in r.report(summary)


def test_the_eval_asks_each_question_of_the_orchestrator_and_writes_its_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: list[httpx.Request] = []
    truth = {q.text: q.expected for q in r.QUESTIONS}

    def fleet(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        body = json.loads(request.content)
        question = body["messages"][-1]["content"]
        routed = truth[question] if question != r.QUESTIONS[0].text else r.OPS  # one miss
        return httpx.Response(200, json=completion([routed], f"{routed} answered"))

    output = tmp_path / "out" / "routing.json"
    argv = ["--base-url", "http://fleet.test", "--api-key", "sk-test", "--output", str(output)]
    assert r.main(argv, transport=httpx.MockTransport(fleet)) == 0
    assert len(sent) == len(r.QUESTIONS)
    first = json.loads(sent[0].content)
    assert first["model"] == "orchestrator" and "tool_choice" not in first and "max_tokens" not in first
    assert sent[0].headers["authorization"] == "Bearer sk-test" and sent[0].url.path == "/v1/chat/completions"
    written = json.loads(output.read_text())
    overall = written["summary"]["overall"]
    assert (overall["questions"], overall["correct"]) == (len(r.QUESTIONS), len(r.QUESTIONS) - 1)
    assert written["outcomes"][0]["routed"] == r.OPS and not written["outcomes"][0]["correct"]
    printed = capsys.readouterr().out
    assert f"routing accuracy (orchestrator): {len(r.QUESTIONS) - 1}/{len(r.QUESTIONS)}" in printed
    assert "MISS" in printed and f"wrote {output}" in printed
