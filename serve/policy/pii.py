"""PII detection and redaction: e-mail, phone, US SSN, payment card, IBAN, IP address.

Detection is pattern plus checksum where one exists (Luhn for cards, ISO 13616 mod-97
for IBANs), so order numbers and SKUs are not taken for cards. A :class:`Finding` holds
the kind and the position, never the value: findings travel into policy input, audit
records and metrics, which must not carry PII in clear text.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

__all__ = ["PII_KINDS", "Finding", "PiiKind", "StreamRedactor", "redact", "scan", "scrub_name"]

PiiKind = Literal["email", "phone", "ssn", "card", "iban", "ip"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "ssn", "card", "iban", "ip")


@dataclass(frozen=True)
class Finding:
    kind: PiiKind
    start: int
    end: int


def _luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ssn(text: str) -> bool:
    area, group, serial = text.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _phone(text: str) -> bool:
    return 8 <= sum(c.isdigit() for c in text) <= 15


def _always(_: str) -> bool:
    return True


# Most specific first: where two kinds overlap, the earlier one wins. Each pattern starts
# with a character class and checks what precedes its first character with a lookbehind
# placed after it: the regex engine then skips ahead to candidate characters, which makes
# a scan several times faster than a leading lookbehind would.
_DETECTORS: tuple[tuple[PiiKind, re.Pattern[str], Callable[[str], bool]], ...] = (
    (
        "email",
        re.compile(
            r"[A-Za-z0-9._%+-](?<![A-Za-z0-9._%+-].)[A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
        ),
        _always,
    ),
    (
        "iban",
        re.compile(r"[A-Z](?<![A-Za-z0-9].)[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
        _iban,
    ),
    # A card number stands alone: digits inside a word (a hex id, a hash) are not one.
    ("card", re.compile(r"\d(?<![\w-].)(?:[ -]?\d){12,18}(?![\w-])"), _luhn),
    ("ssn", re.compile(r"\d(?<![\d-].)\d{2}-\d{2}-\d{4}(?![\d-])"), _ssn),
    (
        "phone",
        re.compile(r"\+(?<![\w+].)\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)"),
        _phone,
    ),  # +44 20 7946 0958
    (
        "phone",
        re.compile(r"[(\d](?<![\w+].)(?:(?<=\()\d{3}\)|(?<=\d)\d{2})[ .-]?\d{3}[ .-]?\d{4}(?!\w)"),
        _phone,
    ),
    ("ip", re.compile(r"\d(?<![\w.:].)\d{0,2}(?:\.\d{1,3}){3}(?![\w.:])"), _ip),
    (
        "ip",
        re.compile(r"[0-9A-Fa-f:](?<![\w.:].)[0-9A-Fa-f:]*:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]*(?![\w.:])"),
        _ip,
    ),
)


# A kind is only looked for where its telltale character occurs (C-speed checks).
_DIGIT = re.compile(r"\d")
_IBAN_HINT = re.compile(r"[A-Z]{2}\d{2}")
_HINTS: dict[str, Callable[[str], bool]] = {
    "email": lambda t: "@" in t,
    "iban": lambda t: _IBAN_HINT.search(t) is not None,
    "card": lambda t: _DIGIT.search(t) is not None,
    "ssn": lambda t: "-" in t,
    "phone": lambda t: _DIGIT.search(t) is not None,
    "ip": lambda t: "." in t or "::" in t or t.count(":") >= 2,
}


def scan(text: str, kinds: Iterable[PiiKind] = PII_KINDS) -> list[Finding]:
    """Every PII occurrence in ``text``, in order, without overlaps."""
    wanted = frozenset(kinds)
    if len(text) <= 65536:  # system prompts and tool results repeat: remember recent scans
        return list(_scan_cached(text, wanted))
    return _scan(text, wanted)


@lru_cache(maxsize=2048)
def _scan_cached(text: str, wanted: frozenset[str]) -> tuple[Finding, ...]:
    return tuple(_scan(text, wanted))


def _scan(text: str, wanted: frozenset[str]) -> list[Finding]:
    found: list[Finding] = []
    for kind, pattern, valid in _DETECTORS:
        if kind not in wanted or not _HINTS[kind](text):
            continue
        for match in pattern.finditer(text):
            start, end = match.span()
            if valid(match.group()) and not any(f.start < end and start < f.end for f in found):
                found.append(Finding(kind, start, end))
    return sorted(found, key=lambda f: f.start)


def redact(text: str, findings: list[Finding]) -> str:
    """``text`` with each finding replaced by ``[REDACTED:<kind>]``."""
    out, last = [], 0
    for f in findings:
        out.append(text[last : f.start])
        out.append(f"[REDACTED:{f.kind}]")
        last = f.end
    out.append(text[last:])
    return "".join(out)


# The end of a text that may still grow into PII: a word (e-mail, IP, SSN), a run of
# digits and separators (phone, card), an IBAN's groups.
_OPEN_TAIL = re.compile(r"(?:[A-Z]{2}\d{2}[A-Z0-9 ]*|[+(]?\d[\d \-().]*|\S+)\Z")


class StreamRedactor:
    """Redacts a stream of text pieces as they come.

    Text is released up to where PII could still be forming (the last word, or a run of
    digit groups), so a card number is complete, found and redacted before any of it
    leaves; ordinary prose is held back by one word at most.
    """

    def __init__(self) -> None:
        self._pending = ""
        self.found: set[str] = set()  # the kinds redacted so far

    def feed(self, piece: str) -> str:
        self._pending += piece
        tail = _OPEN_TAIL.search(self._pending)
        cut = tail.start() if tail else len(self._pending)
        findings = scan(self._pending)
        for f in findings:
            if f.start < cut < f.end:
                cut = f.start
        if cut <= 0:
            return ""
        return self._release(cut, [f for f in findings if f.end <= cut])

    def flush(self) -> str:
        return self._release(len(self._pending), scan(self._pending))

    def _release(self, cut: int, findings: list[Finding]) -> str:
        self.found.update(f.kind for f in findings)
        out = redact(self._pending[:cut], findings)
        self._pending = self._pending[cut:]
        return out


def scrub_name(name: str, limit: int = 64) -> str:
    """A name a model made up, fit for a label or a record: PII redacted, length capped."""
    return redact(name, scan(name))[:limit]
