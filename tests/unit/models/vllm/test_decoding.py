"""serve.models.vllm.decoding: reading an ``auto`` reply's JSON as it is generated."""

from __future__ import annotations

import json

import pytest

from serve.models.vllm.decoding import JsonAnswerScanner, JsonValueText


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
