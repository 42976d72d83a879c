"""serve.models.vllm.decoding: reading an ``auto`` reply's JSON as it is generated; the
repetition guard that ends a reply fallen into a loop."""

from __future__ import annotations

import json

import pytest

from serve.models.vllm.decoding import JsonAnswerScanner, JsonValueText, RepetitionGuard, repeating_unit


@pytest.mark.parametrize(
    "answer",
    [
        "Paris is the capital.",
        'He said \\"hi\\"\\n\\t\\u00e9 \\\\ done',
        "emoji \\ud83d\\ude00 and \\u2603",
        "",
    ],
)
def test_the_content_string_streams_exactly_at_any_split(answer: str) -> None:
    text = '{"content": "' + answer + '"}'
    expected = json.loads(text)["content"]
    for step in (1, 2, 3, 7):
        scanner = JsonAnswerScanner()
        pieces = [scanner.feed(text[i : i + step]) for i in range(0, len(text), step)]
        assert "".join(pieces) == expected
        assert scanner.kind == "content"


def test_a_call_streams_no_content() -> None:
    scanner = JsonAnswerScanner()
    text = '{"name": "get_weather", "arguments": {"city": "content"}}'
    assert [scanner.feed(ch) for ch in text] == [""] * len(text)
    assert scanner.kind == "call"


@pytest.mark.parametrize(
    "answer",
    ['{"days":12,"note":"a } and a ] and a \\" inside"}', '[1,{"a":[]}]', '"just text"', "12", "true", "{}"],
)
def test_a_formatted_answer_streams_as_its_json_text_at_any_split(answer: str) -> None:
    text = '{"content":' + answer + "}"
    for step in (1, 2, 5, 100):
        scanner = JsonAnswerScanner(raw=True)
        pieces = [scanner.feed(text[i : i + step]) for i in range(0, len(text), step)]
        assert "".join(pieces) == answer  # the wrapper's closing brace is not the answer's
        assert json.loads("".join(pieces)) == json.loads(text)["content"]


def test_the_value_text_ends_where_its_json_does() -> None:
    value = JsonValueText()
    assert value.take("  ") == "" and not value.started  # leading blanks are not the answer's
    assert value.take('{"a":"{') == '{"a":"{'
    assert value.take('"}}, more') == '"}' and value.done
    assert value.take("}") == ""


LIMITS = {"min_chars": 48, "max_period": 48, "min_repeats": 4}


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("2023-08-22 12:32:53.143" + ".14" * 16, ".14"),  # issue 17's answer, 48 characters of it
        ("Sure! " + "!" * 48, "!"),
        ("Answer: " + "I cannot help with that. " * 4, "I cannot help with that. "),
        ("x" + "ab" * 24, "ab"),  # the shortest unit: "abab" is not reported
    ],
)
def test_a_text_ending_in_a_loop_names_its_unit(text: str, unit: str) -> None:
    assert repeating_unit(text, **LIMITS) == unit


@pytest.mark.parametrize(
    "text",
    [
        "2023-08-22 12:32:53.143" + ".14" * 15,  # 45 characters of it: not yet
        "Paris is the capital of France. " * 3,  # three times: a quote, a list, not yet a loop
        "| sku | on hand |\n|---|---|\n| SKU-1001 | 420 |\n| SKU-1002 | 2600 |",
        "The carry-over limit is 5 days; carried-over days expire on 31 March. " * 1,
        "",
        "x" * 47,
    ],
)
def test_ordinary_text_is_no_loop(text: str) -> None:
    assert repeating_unit(text, **LIMITS) is None


def test_the_guard_sees_a_loop_across_deltas_as_soon_as_it_is_one() -> None:
    guard = RepetitionGuard(**LIMITS)
    assert not guard.feed("The balance is 14 days")
    fed = [guard.feed(".14") for _ in range(20)]
    assert fed.index(True) == 15  # the 16th repeat makes 48 characters
    assert not guard.feed("")  # an empty delta (a special token) changes nothing


def test_the_guard_keeps_a_bounded_tail() -> None:
    guard = RepetitionGuard(**LIMITS)
    for i in range(2000):
        guard.feed(f"word{i} ")
    assert len(guard._tail) <= 4 * 48
