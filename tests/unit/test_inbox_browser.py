"""The approvals inbox in a real headless browser (Debian's chromium, driven by Playwright).

No Ray: a fake of the fleet's approvals API serves the page and its JSON from a thread
on 127.0.0.1, under a route prefix (``/t/v1/approvals``), so the page's own-path logic
is what finds the list. A person types a key, loads, approves one with a reason, and
tries to reject another that someone decided meanwhile.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from serve.approvals.inbox import render_inbox
from serve.errors import Conflict, NotFound, RequestError, Unauthorized

PREFIX = "/t/v1/approvals"
KEY = "fk-approver"
WAIT_MS = 20_000  # a busy 2-core machine: the conditions are waited on, not slept for
SNEAKY = "<img src=x onerror=\"document.title='owned'\">"


def approval(approval_id: str, tool: str, now: float, **arguments: Any) -> dict[str, Any]:
    return {
        "object": "approval",
        "id": approval_id,
        "status": "pending",
        "agent": "supply-chain-optimizer",
        "agent_version": "1.2.0",
        "tool": tool,
        "arguments": arguments,
        "request_id": f"req_{approval_id}",
        "tenant": "acme",
        "requester": "key:acme-ops",
        "created_at": now - 180,
        "expires_at": now + 23 * 3600 + 1800,
        "decision": None,
        "result": None,
    }


@dataclass
class Asked:
    method: str
    path: str
    authorization: str | None
    content_type: str | None
    body: Any


@dataclass
class FakeApprovals:
    """The approvals routes as the page sees them; ``refuse`` answers a decision with an error."""

    approvals: dict[str, dict[str, Any]]
    refuse: dict[str, RequestError] = field(default_factory=dict)
    asked: list[Asked] = field(default_factory=list)
    url: str = ""

    def answer(self, asked: Asked, query: str) -> tuple[int, str, str]:
        if asked.method == "GET" and asked.path == PREFIX and query == "format=html":
            return 200, "text/html; charset=utf-8", render_inbox()  # the route needs no key
        self.asked.append(asked)
        if asked.authorization != f"Bearer {KEY}":
            return self.error(Unauthorized("a valid Bearer key is required"))
        if asked.method == "GET" and asked.path == PREFIX and query == "status=pending":
            pending = [a for a in self.approvals.values() if a["status"] == "pending"]
            return self.json(200, {"object": "list", "data": pending})
        head, _, verb = asked.path.rpartition("/")
        approval_id = head.removeprefix(f"{PREFIX}/")
        if asked.method != "POST" or verb not in ("approve", "reject") or approval_id not in self.approvals:
            return self.error(NotFound(f"no route {asked.method} {asked.path}"))
        if approval_id in self.refuse:
            return self.error(self.refuse[approval_id])
        decided = self.approvals[approval_id]
        decided["status"] = "approved" if verb == "approve" else "rejected"
        decided["decision"] = {"outcome": decided["status"], "by": "key:approver", "at": time.time()}
        decided["decision"]["reason"] = asked.body.get("reason")
        return self.json(200, decided)

    def json(self, status: int, doc: Any) -> tuple[int, str, str]:
        return status, "application/json", json.dumps(doc)

    def error(self, error: RequestError) -> tuple[int, str, str]:
        return self.json(error.status, {"error": error.to_dict()})


class Handler(BaseHTTPRequestHandler):
    fake: FakeApprovals  # set on the subclass each server gets

    def do_GET(self) -> None:
        self.reply(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        self.reply(json.loads(raw) if raw else None)

    def reply(self, body: Any) -> None:
        url = urlsplit(self.path)
        asked = Asked(
            self.command, url.path, self.headers.get("authorization"), self.headers.get("content-type"), body
        )
        status, content_type, text = self.fake.answer(asked, url.query)
        data = text.encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test reads what was asked from the fake, not from stderr


@pytest.fixture
def fake() -> Iterator[FakeApprovals]:
    now = time.time()
    fake = FakeApprovals(
        {
            "apr_1": approval("apr_1", "place_order", now, sku="A-100", note=SNEAKY),
            "apr_2": approval("apr_2", "cancel_order", now, order="PO-7"),
        },
        refuse={"apr_2": Conflict("approval 'apr_2' was decided already", param="approval_id")},
    )
    handler = type("FakeHandler", (Handler,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free one
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        fake.url = f"http://127.0.0.1:{server.server_address[1]}"
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed: `make browser` (or `make test`) installs Debian's package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


def test_an_approver_loads_approves_with_a_reason_and_sees_a_refusal(fake: FakeApprovals, page: Page) -> None:
    page.goto(f"{fake.url}{PREFIX}?format=html")
    page.fill("#key", KEY)
    page.click("#load")
    rows = page.locator("tr[data-approval-id]")
    expect(rows).to_have_count(2, timeout=WAIT_MS)
    first, second = (page.locator(f'tr[data-approval-id="{i}"]') for i in ("apr_1", "apr_2"))
    expect(first).to_contain_text("supply-chain-optimizer")
    expect(first).to_contain_text("version 1.2.0")
    expect(first).to_contain_text("3 min ago")
    expect(first).to_contain_text("in 23 h")
    # The arguments are text: the markup in them is shown, not run.
    expect(first.locator("pre")).to_contain_text(f'"note": {json.dumps(SNEAKY)}')
    expect(page.locator("table img")).to_have_count(0)
    assert page.title() == "Approvals"

    first.locator("input.reason").fill("checked with finance")
    first.locator("button.approve").click()
    expect(first).to_have_count(0, timeout=WAIT_MS)  # decided: the list no longer holds it
    expect(page.locator("#status")).to_have_text("Approved apr_1")
    expect(second).to_have_count(1)

    second.locator("button.reject").click()
    expect(page.locator("#status")).to_have_text("approval 'apr_2' was decided already", timeout=WAIT_MS)
    expect(second).to_have_count(1)
    expect(second.locator("button.reject")).to_be_enabled()

    decisions = [(a.path, a.content_type, a.body) for a in fake.asked if a.method == "POST"]
    assert decisions == [
        (f"{PREFIX}/apr_1/approve", "application/json", {"reason": "checked with finance"}),
        (f"{PREFIX}/apr_2/reject", "application/json", {}),
    ]
    assert {a.authorization for a in fake.asked} == {f"Bearer {KEY}"}
    assert any(a.method == "GET" and a.path == PREFIX for a in fake.asked)  # the list, at the page's path


def test_a_reload_keeps_the_key_and_loads_by_itself(fake: FakeApprovals, page: Page) -> None:
    page.goto(f"{fake.url}{PREFIX}?format=html")
    expect(page.locator("#empty")).to_be_hidden()  # nothing asked yet: nothing said about it
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    expect(page.locator("tr[data-approval-id]")).to_have_count(2, timeout=WAIT_MS)
    for approval_id in list(fake.approvals):
        fake.approvals[approval_id]["status"] = "expired"
    page.reload()
    expect(page.locator("#key")).to_have_value(KEY)
    expect(page.locator("#empty")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("tr[data-approval-id]")).to_have_count(0)
    assert page.url == f"{fake.url}{PREFIX}?format=html"  # the key form never submitted it anywhere


def test_a_wrong_key_shows_the_fleets_message(fake: FakeApprovals, page: Page) -> None:
    page.goto(f"{fake.url}{PREFIX}?format=html")
    page.fill("#key", "fk-wrong")
    page.click("#load")
    expect(page.locator("#status")).to_have_text("a valid Bearer key is required", timeout=WAIT_MS)
    expect(page.locator("tr[data-approval-id]")).to_have_count(0)
