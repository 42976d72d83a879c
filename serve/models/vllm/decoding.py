"""Reading the generated text as it streams: content to pass on, tool calls at the end.

One decoder per reply, chosen by the backend for the request's tools and ``tool_choice``:
plain text, one forced call, an ``auto`` JSON answer (content or a call, see
:class:`JsonAnswerScanner`), or vLLM's tool parser in ``parser`` mode. Beside it a
:class:`RepetitionGuard` watches the raw text for a degenerate loop.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from serve.errors import ModelError
from serve.protocol import FunctionCall, ToolCall

__all__ = [
    "AutoDecoder",
    "CallDecoder",
    "Decoder",
    "JsonAnswerScanner",
    "JsonValueText",
    "ParserDecoder",
    "RepetitionGuard",
    "TextDecoder",
    "repeating_unit",
]

_CONTENT_START = re.compile(r'\s*\{\s*"content"\s*:\s*"')
_VALUE_START = re.compile(r'\s*\{\s*"content"\s*:')
_CALL_START = re.compile(r'\s*\{\s*"name"')


def _safe_string_prefix(body: str) -> tuple[str, bool]:
    """The decoded JSON string body so far, and whether its closing quote was seen.

    Stops before an escape that is not complete yet, so the decoded text only grows.
    """
    i = 0
    while i < len(body):
        char = body[i]
        if char == '"':
            return json.loads(f'"{body[:i]}"', strict=False), True
        if char != "\\":
            i += 1
            continue
        width = 2
        if body[i + 1 : i + 2] == "u":
            digits = body[i + 2 : i + 6]
            # A high surrogate is decoded together with its low half, or not yet at all.
            width = 12 if len(digits) == 4 and 0xD800 <= int(digits, 16) <= 0xDBFF else 6
        if i + width > len(body):
            break
        i += width
    return json.loads(f'"{body[:i]}"', strict=False), False


class JsonValueText:
    """The text of one JSON value as it is generated, up to its end: what follows (the
    rest of the object around it) is not the value's."""

    def __init__(self) -> None:
        self.depth = 0
        self.started = self.done = False
        self._in_string = self._escaped = False

    def take(self, text: str) -> str:
        """The part of ``text`` that belongs to the value."""
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        for i, char in enumerate(text):
            if self.done:
                return text[:i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    self.done = self.depth == 0
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]," and self.depth == 0:  # a scalar ended: this is the object's
                self.done = True
                return text[:i]
            elif char in "}]":
                self.depth -= 1
                self.done = self.depth == 0
        return text


class JsonAnswerScanner:
    """Follows an ``auto`` answer (``{"content": ...}`` or a call) as it is generated.

    ``raw``: the answer is JSON (a ``response_format``), passed on as its text; otherwise
    it is a JSON string, passed on decoded."""

    def __init__(self, raw: bool = False) -> None:
        self.text = ""
        self.kind: Literal["unknown", "content", "call"] = "unknown"
        self._value = JsonValueText() if raw else None
        self._body = 0
        self._sent = 0

    def feed(self, delta: str) -> str:
        """Add generated text; return the new part of the answer, if any."""
        self.text += delta
        if self.kind == "unknown":
            if found := (_VALUE_START if self._value else _CONTENT_START).match(self.text):
                self.kind, self._body = "content", found.end()
            elif _CALL_START.match(self.text):
                self.kind = "call"
        if self.kind != "content":
            return ""
        if self._value is not None:
            new, self._body = self._value.take(self.text[self._body :]), len(self.text)
            return new
        decoded, _closed = _safe_string_prefix(self.text[self._body :])
        new = decoded[self._sent :]
        self._sent = len(decoded)
        return new


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_call(text: str) -> ToolCall:
    try:
        value = json.loads(text)
        return ToolCall(
            id=_call_id(),
            function=FunctionCall(name=value["name"], arguments=json.dumps(value["arguments"])),
        )
    except (ValueError, KeyError, TypeError) as exc:
        # Cannot happen under the schema constraint unless the engine ignored it.
        raise ModelError(f"the model wrote a malformed tool call ({type(exc).__name__})") from None


class Decoder(Protocol):
    """Reads one reply: ``feed`` returns the content to stream, ``finish`` the tool calls."""

    def feed(self, delta: str, token_ids: Sequence[int]) -> str: ...

    def finish(self, truncated: bool) -> list[ToolCall]: ...


class TextDecoder:
    """No tools: the text is the answer."""

    def feed(self, delta: str, token_ids: Sequence[int]) -> str:
        return delta

    def finish(self, truncated: bool) -> list[ToolCall]:
        return []


class CallDecoder:
    """Named or required choice: the whole reply is one call, returned at the end."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, delta: str, token_ids: Sequence[int]) -> str:
        self._parts.append(delta)
        return ""

    def finish(self, truncated: bool) -> list[ToolCall]:
        # A call cut off by max_tokens has no valid arguments: report "length", no call.
        return [] if truncated else [_parse_call("".join(self._parts))]


class AutoDecoder:
    """``structured`` mode, ``auto``: a ``{"content": ...}`` answer streams; a call comes at the end.

    ``raw``: the answer is JSON under a ``response_format``; its text streams."""

    def __init__(self, raw: bool = False) -> None:
        self._scanner = JsonAnswerScanner(raw)

    def feed(self, delta: str, token_ids: Sequence[int]) -> str:
        return self._scanner.feed(delta)

    def finish(self, truncated: bool) -> list[ToolCall]:
        if self._scanner.kind == "call" and not truncated:
            return [_parse_call(self._scanner.text)]
        if self._scanner.kind == "unknown" and not truncated:
            raise ModelError("the model's reply was neither an answer nor a tool call")
        return []


class ParserDecoder:
    """``parser`` mode, ``auto``: content streams through the parser; calls come from the full text."""

    def __init__(self, parser: Any, request: Any) -> None:
        self._parser, self._request = parser, request
        self._text = ""
        self._ids: list[int] = []

    def feed(self, delta: str, token_ids: Sequence[int]) -> str:
        previous_text, previous_ids = self._text, self._ids
        self._text, self._ids = previous_text + delta, [*previous_ids, *token_ids]
        message = self._parser.extract_tool_calls_streaming(
            previous_text, self._text, delta, previous_ids, self._ids, list(token_ids), self._request
        )
        return str(message.content or "") if message is not None else ""

    def finish(self, truncated: bool) -> list[ToolCall]:
        info = self._parser.extract_tool_calls(self._text, self._request)
        if not info.tools_called:
            return []
        return [
            ToolCall(
                id=_call_id(), function=FunctionCall(name=c.function.name, arguments=c.function.arguments)
            )
            for c in info.tool_calls
        ]


def repeating_unit(text: str, *, min_chars: int, max_period: int, min_repeats: int) -> str | None:
    """The unit ``text`` ends repeating, or ``None``: its last ``min_chars`` characters or
    more are one unit of at most ``max_period`` characters, ``min_repeats`` times or more
    (the shortest such unit: ``"abab"`` repeats ``"ab"``, ``"aaaa"`` repeats ``"a"``)."""
    for period in range(1, max_period + 1):
        span = max(min_chars, min_repeats * period)
        if span > len(text):  # longer units need a longer stretch still
            return None
        # A stretch has period p when it equals itself shifted by p (C-speed slices).
        if text[len(text) - span + period :] == text[len(text) - span : len(text) - period]:
            return text[len(text) - period :]
    return None


class RepetitionGuard:
    """Watches a reply's raw text as it is generated: :meth:`feed` says when it has fallen
    into a loop (see :func:`repeating_unit`), so that the backend ends it at once rather
    than at ``max_tokens``. Keeps only the tail a loop can be seen in."""

    def __init__(self, *, min_chars: int, max_period: int, min_repeats: int) -> None:
        self._limits = {"min_chars": min_chars, "max_period": max_period, "min_repeats": min_repeats}
        self._keep = max(min_chars, min_repeats * max_period)
        self._tail = ""

    def feed(self, delta: str) -> bool:
        """Add generated text; whether the text now ends in a loop."""
        if not delta:
            return False
        self._tail = (self._tail + delta)[-self._keep :]
        return repeating_unit(self._tail, **self._limits) is not None
