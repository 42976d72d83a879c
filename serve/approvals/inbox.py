"""The approvals inbox page: one self-contained document, with no data in it.

The route serves it to anyone; the page asks the fleet for the pending approvals itself,
with the key a person types, at its own path (so it works behind a route prefix). Every
value from the fleet reaches the page as text (``textContent``), never as markup: the
arguments are a caller's, and the inbox is where an approver with power reads them.
"""

from __future__ import annotations

__all__ = ["render_inbox"]

# The CSP is a second guard on "self-contained": no script, style, image or frame from
# elsewhere, fetches to this origin only, and the key form never submits anywhere.
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Approvals</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem;max-width:90rem}
form{display:flex;gap:.5rem;align-items:center;margin-bottom:1rem}
table{border-collapse:collapse;width:100%;margin-bottom:1.5rem}
td,th{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}th{background:#f4f4f4}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font-size:.85rem;max-height:16rem;overflow:auto}
.id,.version{color:#666;font-size:.8rem}.id{font-family:ui-monospace,monospace}
.age,.expires,.decide{white-space:nowrap}.decide input{width:12rem}
button.approve{color:#060}button.reject{color:#a00}
#status{min-height:1.5em}#status.error{color:#a00}
</style></head><body>
<h1>Approvals waiting for a decision</h1>
<form id="keyform">
<label for="key">API key</label>
<input id="key" type="password" autocomplete="off" spellcheck="false" size="40">
<button id="load" type="submit">Load</button>
<button id="refresh" type="button">Refresh</button>
</form>
<p id="status" role="status"></p>
<p id="empty" hidden>Nothing is waiting for a decision.</p>
<table id="inbox" hidden>
<thead><tr><th>Agent</th><th>Tool</th><th>Arguments</th><th>Requester</th><th>Tenant</th>
<th>Asked</th><th>Expires</th><th>Decision</th></tr></thead>
<tbody></tbody>
</table>
<script>
"use strict";
const BASE = location.pathname.replace(/[/]+$/, "");  // the list's own path, behind any prefix
const KEY_SLOT = "fleet.approvals.key";
const REFRESH_MS = 10000;
const keyField = document.getElementById("key");
const statusLine = document.getElementById("status");
const table = document.getElementById("inbox");
const rows = table.tBodies[0];
const empty = document.getElementById("empty");
let loadFailed = false;

function say(message, error = false) {
  statusLine.textContent = message;
  statusLine.className = error ? "error" : "";
}

// An answer's body, or an Error carrying the envelope's message.
async function call(url, init = {}) {
  const headers = {...(init.headers || {}), Authorization: `Bearer ${keyField.value}`};
  let answer;
  try {
    answer = await fetch(url, {...init, headers, cache: "no-store"});
  } catch (failure) {
    throw new Error(`could not reach the fleet (${failure.message})`);
  }
  const body = await answer.json().catch(() => null);
  if (!answer.ok) {
    const message = body && body.error && body.error.message;
    throw new Error(message || `the fleet answered HTTP ${answer.status}`);
  }
  return body;
}

// "45 s", "3 min", "23 h", "2 d": the largest whole unit.
function span(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

function cell(row, text, className) {
  const td = row.insertCell();
  if (className) td.className = className;
  if (text !== undefined) td.textContent = text;
  return td;
}

function line(parent, tag, text, className) {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) node.className = className;
  parent.append(node);
  return node;
}

function buildRow(approval) {
  const row = document.createElement("tr");
  row.setAttribute("data-approval-id", approval.id);
  const agent = cell(row);
  line(agent, "div", approval.agent);
  line(agent, "div", `version ${approval.agent_version}`, "version");
  line(agent, "div", approval.id, "id");
  cell(row, approval.tool);
  line(cell(row), "pre", JSON.stringify(approval.arguments, null, 2));
  cell(row, approval.requester);
  cell(row, approval.tenant);
  cell(row, "", "age");
  cell(row, "", "expires");
  const decision = cell(row, undefined, "decide");
  const reason = document.createElement("input");
  reason.className = "reason";
  reason.placeholder = "reason (optional)";
  reason.setAttribute("aria-label", `Reason for ${approval.id}`);
  decision.append(reason);
  for (const [approve, text] of [[true, "Approve"], [false, "Reject"]]) {
    decision.append(" ");
    const node = line(decision, "button", text, approve ? "approve" : "reject");
    node.type = "button";
    node.addEventListener("click", () => decide(approval.id, approve, reason.value, decision));
  }
  return row;
}

function showTimes(row, approval, now) {
  const age = row.querySelector(".age");
  const expires = row.querySelector(".expires");
  age.textContent = `${span(now - approval.created_at)} ago`;
  const left = approval.expires_at - now;
  expires.textContent = left > 0 ? `in ${span(left)}` : "expired";
  age.title = new Date(approval.created_at * 1000).toLocaleString();  // the moment, on hover
  expires.title = new Date(approval.expires_at * 1000).toLocaleString();
}

// Rows already shown are kept, not rebuilt: a reason half typed survives a refresh.
function show(approvals) {
  const now = Date.now() / 1000;
  const shown = new Map([...rows.rows].map((row) => [row.getAttribute("data-approval-id"), row]));
  approvals.forEach((approval, at) => {
    const row = shown.get(approval.id) || buildRow(approval);
    shown.delete(approval.id);
    showTimes(row, approval, now);
    if (rows.rows[at] !== row) rows.insertBefore(row, rows.rows[at] || null);
  });
  shown.forEach((row) => row.remove());
  table.hidden = approvals.length === 0;
  empty.hidden = approvals.length !== 0;
}

async function load(quiet) {
  if (!keyField.value) {
    if (!quiet) say("Type an API key, then Load.", true);
    return;
  }
  try {
    const list = await call(`${BASE}?status=pending`);
    const pending = list.data.filter((approval) => approval.status === "pending");
    show(pending);
    if (!quiet || loadFailed) say(`${pending.length} pending`);
    loadFailed = false;
  } catch (failure) {
    loadFailed = true;
    say(failure.message, true);
  }
}

async function decide(id, approve, reason, controls) {
  const buttons = controls.querySelectorAll("button");
  buttons.forEach((node) => { node.disabled = true; });
  const body = reason.trim() ? {reason: reason.trim()} : {};
  try {
    await call(`${BASE}/${encodeURIComponent(id)}/${approve ? "approve" : "reject"}`, {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body),
    });
    say(`${approve ? "Approved" : "Rejected"} ${id}`);
    await load(true);
  } catch (failure) {
    say(failure.message, true);
  } finally {
    buttons.forEach((node) => { node.disabled = false; });
  }
}

document.getElementById("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_SLOT, keyField.value);
  rows.replaceChildren();  // another key may see other approvals
  load(false);
});
document.getElementById("refresh").addEventListener("click", () => load(false));
setInterval(() => { if (!document.hidden) load(true); }, REFRESH_MS);
keyField.value = sessionStorage.getItem(KEY_SLOT) || "";
if (keyField.value) load(false);
</script>
</body></html>
"""


def render_inbox() -> str:
    return _PAGE
