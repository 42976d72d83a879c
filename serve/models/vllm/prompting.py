"""What the model is shown: the JSON schema its reply must follow, and the prompt.

In ``structured`` mode the reply is generated under a JSON-schema constraint (vLLM
structured outputs), so a call always names a known tool and its arguments always match
that tool's parameter schema:

- named ``tool_choice``: ``{"name": <that tool>, "arguments": <its parameters>}``;
- ``"required"``: the same object, for any of the tools (``anyOf``);
- ``"auto"``: any of those, or ``{"content": "<plain answer>"}``, whose string is streamed
  as it is generated; under a ``response_format``, ``{"content": <the answer's JSON>}``,
  whose JSON text is streamed (see :func:`answer_schema`).

A ``response_format`` binds the answer only: a reply without tools is generated under its
schema; a reply that may call a tool keeps the tools' schemas and answers under it.

Models whose chat templates ignore ``tools`` (SmolLM2's does) would not know the tools
exist, so the tools and the expected JSON are described in a system-message addendum,
and the conversation is flattened to plain text turns (see :func:`flatten_messages`).
A small model also tends to call the same tool again after its result: ``max_tool_rounds``
lets it only answer after that many rounds (see :func:`tool_rounds`).

Pure functions: no vLLM, no engine.
"""

from __future__ import annotations

import json
from typing import Any

from serve.errors import InvalidRequest
from serve.protocol import JsonObjectFormat, JsonSchemaFormat, TextFormat

__all__ = [
    "CONTENT_SCHEMA",
    "answer_schema",
    "flatten_messages",
    "format_instructions",
    "tool_call_schema",
    "tool_instructions",
    "tool_rounds",
    "with_system_addendum",
]

CONTENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"content": {"type": "string"}},
    "required": ["content"],
    "additionalProperties": False,
}


_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def answer_schema(
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None,
) -> dict[str, Any] | None:
    """The JSON schema an answer must follow, or ``None`` for free text."""
    if isinstance(response_format, JsonSchemaFormat):
        return response_format.json_schema.schema_ or dict(_ANY_OBJECT)
    if isinstance(response_format, JsonObjectFormat):
        return dict(_ANY_OBJECT)
    return None


def _content_schema(answer: dict[str, Any] | None) -> dict[str, Any]:
    if answer is None:
        return CONTENT_SCHEMA
    return {**CONTENT_SCHEMA, "properties": {"content": answer}}


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = tool.get("function", tool)
    return function


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = _function(tool).get("parameters") or {"type": "object", "properties": {}}
    return params


def _named_choice(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        return str(tool_choice.get("function", {}).get("name", ""))
    return None


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": _function(tool)["name"]}, "arguments": _parameters(tool)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _chosen_tools(tools: list[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]]:
    name = _named_choice(tool_choice)
    if name is None:
        return tools
    chosen = [t for t in tools if _function(t).get("name") == name]
    if not chosen:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return chosen


def tool_call_schema(
    tools: list[dict[str, Any]], tool_choice: Any, answer: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The JSON schema a reply must follow, or ``None`` when it is free text.

    ``answer``: the schema of an ``auto`` answer's ``content`` (default: a string); with
    no tools to call, the reply is the answer itself."""
    if not tools or tool_choice == "none":
        return answer
    options = [_call_schema(t) for t in _chosen_tools(tools, tool_choice)]
    if tool_choice == "auto":
        options.append(_content_schema(answer))
    return options[0] if len(options) == 1 else {"anyOf": options}


def _described(answer: dict[str, Any]) -> str:
    if answer == _ANY_OBJECT:
        return "a JSON object"
    return f"JSON following this JSON schema: {json.dumps(answer, separators=(',', ':'))}"


def format_instructions(answer: dict[str, Any] | None) -> str:
    """The system-prompt addendum for an answer bound to a JSON schema (none for text)."""
    return f"Reply with only {_described(answer)}." if answer is not None else ""


def tool_instructions(
    tools: list[dict[str, Any]],
    tool_choice: Any,
    *,
    list_tools: bool = True,
    answer: dict[str, Any] | None = None,
) -> str:
    """The system-prompt addendum that tells the model its tools and the JSON to write."""
    if not tools or tool_choice == "none":
        return format_instructions(answer)
    lines: list[str] = []
    if list_tools:
        lines.append("You can call these tools (parameters are JSON schemas):")
        for tool in tools:
            function = _function(tool)
            description = function.get("description") or "(no description)"
            params = json.dumps(_parameters(tool), separators=(",", ":"))
            lines.append(f"- {function['name']}: {description} Parameters: {params}")
    call = '{"name": <tool name>, "arguments": {<arguments>}}'
    name = _named_choice(tool_choice)
    if name is not None:
        lines.append(
            f'Call the tool {name}: reply with only {{"name": "{name}", "arguments": {{<arguments>}}}}.'
        )
    elif tool_choice == "required":
        lines.append(f"Call one of the tools: reply with only {call}.")
    else:
        lines.append(
            f'To call a tool, reply with only {call}. To answer directly, reply with {{"content": <answer>}}'
            + (f", where <answer> is {_described(answer)}." if answer is not None else ".")
        )
    return "\n".join(lines)


def tool_rounds(messages: list[dict[str, Any]]) -> int:
    """Assistant turns with tool calls since the last user message."""
    rounds = 0
    for message in reversed(messages):
        if message.get("role") == "user":
            break
        if message.get("role") == "assistant" and message.get("tool_calls"):
            rounds += 1
    return rounds


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """``name(arguments) returned: result`` for each tool result in ``messages``."""
    calls: dict[str, str] = {}
    results: list[str] = []
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call["function"]
            calls[call.get("id", "")] = f"{function['name']}({function['arguments']})"
        if message.get("role") == "tool":
            called = calls.get(message.get("tool_call_id", ""), "a tool")
            results.append(f"{called} returned: {_text(message.get('content'))}")
    return results


def flatten_messages(messages: list[dict[str, Any]], addendum: str = "") -> list[dict[str, Any]]:
    """Messages any plain chat template renders: only system, user and assistant text.

    The tool results gathered since the last user message come right before that
    message's question, in one user turn; the calls themselves and earlier turns' tool
    traffic are left out (those turns' answers carry what they found). Measured with
    SmolLM2-135M: given the results as separate turns after the question, it calls the
    same tool again or echoes the JSON; given them just before the question, it answers
    from them. ``addendum`` joins the first system message (or becomes one).
    """
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages))
    flat: list[dict[str, Any]] = []
    for message in messages[:last_user]:
        role, text = message.get("role"), _text(message.get("content"))
        if role in ("system", "developer"):
            flat.append({"role": "system", "content": text})
        elif role == "user" or (role == "assistant" and text):
            flat.append({"role": role, "content": text})
    if last_user < len(messages):
        question = _text(messages[last_user].get("content"))
        results = _tool_results(messages[last_user + 1 :])
        if results:
            question = "\n".join(results) + f"\n\nUsing this, answer: {question}"
        flat.append({"role": "user", "content": question})
    return with_system_addendum(flat, addendum)


def with_system_addendum(messages: list[dict[str, Any]], addendum: str) -> list[dict[str, Any]]:
    """``messages`` with ``addendum`` joined to the first system message (or as a new one)."""
    if not addendum:
        return list(messages)
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{_text(messages[0].get('content'))}\n\n{addendum}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": addendum}, *messages]
