"""The explanation page: its text is escaped once (a literal arrow, an escaped reason)."""

from __future__ import annotations

import html
import re

from serve.explain import render_html

REPORT = {
    "object": "request.explanation",
    "request_id": "req_1",
    "tenant": "acme",
    "agents": ["orchestrator", "hr-policy-advisor"],
    "outcome": {"status": 200, "finish_reason": "stop"},
    "usage": {"prompt_tokens": 8, "completion_tokens": 6},
    "decisions": [
        {
            "seq": 0,
            "agent": "orchestrator",
            "action": "call:orchestrator",
            "outcome": "deny",
            "enforced": True,
            "policy": "fleet.ingress",
            "policy_version": "abc",
            "reasons": ["saw <script>alert(1)</script> & more"],
            "decision_id": "dec_1",
        }
    ],
    "model_calls": [],
    "tool_calls": [],
}


def summary(page: str) -> str:
    match = re.search(r"<p>(.*?)</p>", page, re.S)
    assert match
    return html.unescape(re.sub(r"<[^>]+>", "", match.group(1)))  # as a browser shows it


def test_the_summary_names_the_agents_with_an_arrow_escaped_once() -> None:
    page = render_html(REPORT)
    assert "agents: orchestrator → hr-policy-advisor." in summary(page)
    assert "&amp;rarr;" not in page and "&amp;amp;" not in page


def test_a_reason_is_shown_as_text_never_as_markup() -> None:
    page = render_html(REPORT)
    assert "<script>" not in page
    assert "saw &lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
