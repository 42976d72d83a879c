"""PII detection: each kind found with its checksum, look-alikes left alone, streams redacted."""

from __future__ import annotations

import random

import pytest

from serve.policy.pii import StreamRedactor, redact, scan


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("jane.doe+hr@mail.example.co.uk", "email"),
        ("(415) 555-0134", "phone"),
        ("+44 20 7946 0958", "phone"),
        ("415.555.0134", "phone"),
        ("123-45-6789", "ssn"),
        ("4111 1111 1111 1111", "card"),
        ("5500-0000-0000-0004", "card"),
        ("378282246310005", "card"),
        ("DE89 3704 0044 0532 0130 00", "iban"),
        ("GB82WEST12345698765432", "iban"),
        ("192.168.10.42", "ip"),
        ("2001:db8:85a3::8a2e:370:7334", "ip"),
    ],
)
def test_each_kind_is_found(text: str, kind: str) -> None:
    [finding] = scan(f"before {text} after")
    assert finding.kind == kind
    assert f"before {text} after"[finding.start : finding.end] == text


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # fails Luhn
        "DE89 3704 0044 0532 0130 02",  # fails mod-97 (and its digits fail Luhn)
        "000-12-3456",  # no SSN has area 000
        "999.1.1.1",  # not an IP
        "SKU-1001 E1001 order 2024-11-23",
        "version 3.11 on port 8000",
        "dec_9e7515c3d7bf2e9e5948166257704b93",  # a decision id whose digits pass Luhn: inside a word
    ],
)
def test_look_alikes_are_not_pii(text: str) -> None:
    assert scan(text) == []


def test_a_card_number_stands_alone() -> None:
    # digits inside a word are not a card, however they add up: an id, a hash
    assert scan("dec_9e7515c3d7bf2e9e5948166257704b93 and x4111111111111111") == []
    # a broken IBAN is not one, but a run of digits in it that passes Luhn on its own is a card
    [finding] = scan("DE89 3704 0044 0532 0130 01")
    assert (finding.kind, finding.start) == ("card", 5)


def test_redact_replaces_each_finding_by_its_kind() -> None:
    text = "Mail a@b.io, SSN 123-45-6789."
    assert redact(text, scan(text)) == "Mail [REDACTED:email], SSN [REDACTED:ssn]."


def test_stream_redactor_never_releases_a_piece_of_pii() -> None:
    text = (
        "Reach jane.doe@example.com or (415) 555-0134; card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, host 10.0.0.12. Thanks!"
    )
    expected = redact(text, scan(text))
    rng = random.Random(7)
    for _ in range(300):
        redactor, out, i = StreamRedactor(), [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            out.append(redactor.feed(text[i : i + n]))
            i += n
        out.append(redactor.flush())
        assert "".join(out) == expected


def test_stream_redactor_holds_prose_back_by_one_word_at_most() -> None:
    redactor = StreamRedactor()
    assert redactor.feed("Hello ") == "Hello "
    assert redactor.feed("wor") == ""
    assert redactor.feed("ld, all ") == "world, all "
    assert redactor.flush() == ""
