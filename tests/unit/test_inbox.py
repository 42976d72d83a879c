"""The approvals inbox page as served: one self-contained document, with the hooks its
browser test (and a person's tooling) relies on, that writes the fleet's data as text."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from serve.approvals.inbox import render_inbox

PAGE = render_inbox()


class Elements(HTMLParser):
    """Every start tag of a page, with its attributes; and its doctype."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.doctypes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_decl(self, decl: str) -> None:
        self.doctypes.append(decl)


def elements() -> Elements:
    parsed = Elements()
    parsed.feed(PAGE)
    parsed.close()
    return parsed


def script() -> str:
    scripts = re.findall(r"<script>(.*?)</script>", PAGE, re.S)
    assert len(scripts) == 1
    return str(scripts[0])


def test_the_page_is_one_html_document() -> None:
    parsed = elements()
    assert parsed.doctypes == ["doctype html"]
    assert [tag for tag, _ in parsed.tags].count("html") == 1
    assert PAGE.rstrip().endswith("</html>")


def test_the_page_has_the_hooks_a_person_and_a_test_find() -> None:
    by_id = {attrs["id"]: (tag, attrs) for tag, attrs in elements().tags if "id" in attrs}
    assert by_id["key"][0] == "input" and by_id["key"][1]["type"] == "password"
    assert "name" not in by_id["key"][1]  # nothing would carry the key in a form's URL
    assert by_id["load"][0] == "button"
    assert {"status", "empty"} <= set(by_id)
    assert "hidden" in by_id["empty"][1]  # shown once a load found nothing pending
    code = script()
    for hook in ('"data-approval-id"', '"approve"', '"reject"', '"reason"', "sessionStorage"):
        assert hook in code, hook
    assert "Authorization: `Bearer ${keyField.value}`" in code


def test_the_page_loads_nothing_from_elsewhere() -> None:
    assert "http://" not in PAGE and "https://" not in PAGE
    for tag, attrs in elements().tags:
        assert "src" not in attrs and "href" not in attrs, tag  # inline CSS and JS only
    assert "connect-src 'self'" in PAGE  # and the browser holds it to that


def test_the_page_writes_data_as_text_never_as_markup() -> None:
    code = script()
    assert "textContent" in code
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in code, sink
