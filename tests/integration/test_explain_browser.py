"""The explanation page in a real headless browser (Debian's chromium): what a person reads."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import httpx

from tests.integration.conftest import QA_KEY, Fleet

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def rendered(page: Path, profile: Path) -> str:
    """The page's DOM as chromium built it (``make test`` installs chromium)."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: `make test` installs it (Debian's package)"
    done = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_explanation_page_reads_right_in_a_browser(fleet: Fleet, tmp_path: Path) -> None:
    with httpx.Client(
        base_url=fleet.test_url, headers={"authorization": f"Bearer {QA_KEY}"}, timeout=60
    ) as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "tester", "messages": [{"role": "user", "content": "#delegate now"}]},
        )
        assert answer.status_code == 200, answer.text
        request_id = answer.headers["x-fleet-request-id"]
        page = client.get(f"/v1/requests/{request_id}/explain", params={"format": "html"})
    assert page.status_code == 200
    file = tmp_path / "explain.html"  # the route needs a key, which a URL bar cannot send
    file.write_text(page.text, encoding="utf-8")
    dom = rendered(file, tmp_path / "profile")
    summary = re.search(r"<p>(.*?)</p>", dom, re.S)
    assert summary, dom[:2000]
    shown = " ".join(html.unescape(re.sub(r"<[^>]+>", "", summary.group(1))).split())
    assert "agents: tester → helper." in shown, shown
    assert "&rarr;" not in shown and "&amp;" not in shown
    assert f"Why: request {request_id}" in html.unescape(re.sub(r"<[^>]+>", "", dom))
