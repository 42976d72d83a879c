"""The human-readable page of a request's explanation report (the JSON is the source)."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, select_autoescape

__all__ = ["render_html"]

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Request {{ r.request_id }}</title>
<style>body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}table{border-collapse:collapse;width:100%;margin-bottom:1.5rem}
td,th{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}th{background:#f4f4f4}
.deny{color:#a00}.escalate{color:#a60}.redact{color:#06a}</style></head><body>
<h1>Why: request {{ r.request_id }}</h1>
<p>Tenant <b>{{ r.tenant }}</b>; agents: {{ r.agents | join(" → ") }}.
{% if r.outcome %}Outcome: <b>HTTP {{ r.outcome.status }}</b>{% if r.outcome.code %} ({{ r.outcome.code }}){% endif %}{% if r.outcome.finish_reason %}, finish reason {{ r.outcome.finish_reason }}{% endif %}.{% endif %}
Tokens: {{ r.usage.prompt_tokens }} in, {{ r.usage.completion_tokens }} out; cost {{ r.usage.cost_usd }} USD.</p>
<h2>Policy decisions</h2>
<table><tr><th>#</th><th>Agent</th><th>Action</th><th>Outcome</th><th>Policy</th><th>Reasons</th><th>Decision</th></tr>
{% for d in r.decisions %}<tr><td>{{ d.seq }}</td><td>{{ d.agent }}</td><td>{{ d.action }}</td>
<td class="{{ d.outcome }}">{{ d.outcome }}{% if not d.enforced %} (shadow){% endif %}</td>
<td>{{ d.policy }} @ {{ d.policy_version }}</td><td>{{ d.reasons | join("; ") }}</td><td>{{ d.decision_id }}</td></tr>{% endfor %}
</table>
<h2>Model calls</h2>
<table><tr><th>Agent</th><th>Turn</th><th>Prompt tokens</th><th>Completion tokens</th><th>Tool calls</th><th>Finish</th><th>Cost (USD)</th></tr>
{% for m in r.model_calls %}<tr><td>{{ m.agent }}</td><td>{{ m.turn }}</td><td>{{ m.prompt_tokens }}</td><td>{{ m.completion_tokens }}</td><td>{{ m.tool_calls }}</td><td>{{ m.finish_reason }}</td><td>{{ m.cost_usd }}</td></tr>{% endfor %}
</table>
<h2>Tool calls and delegations</h2>
<table><tr><th>Agent</th><th>Tool</th><th>Status</th><th>Seconds</th></tr>
{% for t in r.tool_calls %}<tr><td>{{ t.agent }}</td><td>{{ t.tool }}</td><td>{{ t.status }}</td><td>{{ t.duration_s }}</td></tr>{% endfor %}
</table>
{% if r.approvals %}<h2>Approvals</h2>
<table><tr><th>Approval</th><th>Agent</th><th>Tool</th><th>Step</th><th>By</th><th>Detail</th></tr>
{% for a in r.approvals %}<tr><td>{{ a.approval_id }}</td><td>{{ a.agent }}</td><td>{{ a.tool }}</td><td>{{ a.event }}</td><td>{{ a.by or "" }}</td><td>{{ a.detail or "" }}</td></tr>{% endfor %}
</table>{% endif %}
</body></html>
"""

_template = Environment(autoescape=select_autoescape(default=True)).from_string(_PAGE)


def render_html(report: dict[str, Any]) -> str:
    return _template.render(r=report)
