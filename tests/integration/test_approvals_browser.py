"""The approvals inbox on the real fleet, in a real headless browser (Debian's chromium,
driven by Playwright): an approver opens the page the fleet serves, types a key, sees the
pending call, approves it; it leaves the list and the request completes."""

from __future__ import annotations

import shutil

from playwright.sync_api import expect, sync_playwright

from tests.integration.conftest import APPROVER_KEY, Fleet
from tests.integration.test_approvals_http import answer_of, finished, parked, runs

WAIT_MS = 30_000


def test_an_approver_approves_in_the_inbox_page_and_the_request_completes(fleet: Fleet) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: `make test` installs it (Debian's package)"
    approval = parked(fleet, "#transfer 21")["fleet"]["approval"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_context().new_page()
            page.goto(f"{fleet.test_url}/v1/approvals?format=html")
            page.fill("#key", APPROVER_KEY)
            page.click("#load")
            row = page.locator(f'tr[data-approval-id="{approval["id"]}"]')
            expect(row).to_have_count(1, timeout=WAIT_MS)
            expect(row).to_contain_text("tester")
            expect(row).to_contain_text("transfer")
            expect(row.locator("pre")).to_contain_text('"amount": 21')
            expect(row.locator("pre")).not_to_contain_text("dana.canary")  # redacted for approvers
            row.locator("input.reason").fill("looks right")
            row.locator("button.approve").click()
            expect(row).to_have_count(0, timeout=WAIT_MS)
            expect(page.locator("#status")).to_have_text(f"Approved {approval['id']}", timeout=WAIT_MS)
        finally:
            browser.close()
    done = finished(fleet, approval["id"])
    assert done["status"] == "completed" and done["decision"]["reason"] == "looks right"
    assert answer_of(done) == "Moving it.transfer said: moved 21"
    assert len(runs(fleet, "transfer", amount=21)) == 1
