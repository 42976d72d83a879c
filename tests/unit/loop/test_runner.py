"""serve.loop.AgentLoop driven by the scripted backend: tools, delegation, client tools, limits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from serve.context import Context
from serve.errors import InvalidRequest, MaxTurnsExceeded, ModelError
from serve.loop.results import AgentResult, ContentDelta, DelegateTarget, Finished, Stats
from serve.loop.runner import AgentLoop
from serve.manifest import AgentSpec, load_agent
from serve.protocol import ChatRequest, FunctionCall, ToolCall, Usage, UserMessage
from serve.testing import ScriptedModel, add, boom, echo, governed, slow
from serve.tools import Tool
from tests.unit.conftest import run, write_agent

TOOLS: dict[str, Tool] = {"echo": echo, "add": add, "boom": boom, "slow": slow}

SCRIPT: dict[str, Any] = {
    "kind": "scripted",
    "script": [
        {"agent": "tester", "match": "#plain", "replies": [{"content": "one two three"}]},
        {
            "agent": "tester",
            "match": r"#echo (?P<text>\w+)",
            "replies": [
                {"tool_calls": [{"name": "echo", "arguments": {"text": "{text}"}}]},
                {"content": "echo said: {tool_result}"},
            ],
        },
        {
            "agent": "tester",
            "match": "#invalid",
            "replies": [
                {"tool_calls": [{"name": "add", "arguments": {"a": "x", "b": 1}}]},
                {"content": "after: {tool_result}"},
            ],
        },
        {
            "agent": "tester",
            "match": "#unknown",
            "replies": [{"tool_calls": [{"name": "launch_missiles"}]}, {"content": "after: {tool_result}"}],
        },
        {
            "agent": "tester",
            "match": "#fail",
            "replies": [{"tool_calls": [{"name": "boom"}]}, {"content": "after: {tool_result}"}],
        },
        {
            "agent": "tester",
            "match": "#slow",
            "replies": [{"tool_calls": [{"name": "slow"}]}, {"content": "after: {tool_result}"}],
        },
        {
            "agent": "tester",
            "match": "#parallel",
            "replies": [
                {
                    "tool_calls": [
                        {"name": "add", "arguments": {"a": 2, "b": 3}},
                        {"name": "echo", "arguments": {"text": "hi"}},
                    ]
                },
                {"content": "done"},
            ],
        },
        {
            "agent": "tester",
            "match": "#baddelegate",
            "replies": [
                {"tool_calls": [{"name": "delegate_to_helper"}]},
                {"content": "after: {tool_result}"},
            ],
        },
        {
            "agent": "tester",
            "match": "#delegate",
            "replies": [
                {"tool_calls": [{"name": "delegate_to_helper", "arguments": {"task": "{input}"}}]},
                {"content": "helper said: {tool_result}"},
            ],
        },
        {
            "agent": "tester",
            "match": "#client",
            "replies": [
                {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
                {"content": "weather: {tool_result}"},
            ],
        },
        {
            "agent": "tester",
            "match": "#mixed",
            "replies": [
                {
                    "content": "checking",
                    "tool_calls": [
                        {"name": "echo", "arguments": {"text": "hi"}},
                        {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    ],
                },
                {"content": "weather: {tool_result}"},
            ],
        },
        {
            "agent": "tester",
            "match": "#loop",
            "replies": [{"tool_calls": [{"name": "echo", "arguments": {"text": "again"}}]}],
        },
        {"agent": "tester", "match": "#model-error", "replies": [{"error": "simulated engine failure"}]},
        {"agent": "tester", "match": "#system", "replies": [{"content": "{system}"}]},
    ],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def build_tester_spec(tmp_path: Path) -> AgentSpec:
    folder = write_agent(
        tmp_path,
        "tester",
        model={"backend": "default", "temperature": 0.3, "max_tokens": 64},
        tools=[
            {"name": "echo", "scope": "test.run"},
            {"name": "add", "scope": "test.run"},
            {"name": "boom", "scope": "test.run"},
            {"name": "slow", "scope": "test.run", "timeout_s": 0.05},
        ],
        delegates=["helper"],
        scopes=["test.run"],
        max_turns=3,
    )
    return load_agent(folder)


class FakeDelegate:
    """A DelegateTarget's call that records what it was asked."""

    def __init__(self, answer: str = "helper handled it", usage: Usage | None = None) -> None:
        self.answer = answer
        self.usage = usage or Usage(prompt_tokens=7, completion_tokens=3)
        self.calls: list[tuple[ChatRequest, Context]] = []
        self.error: Exception | None = None

    async def __call__(self, request: ChatRequest, ctx: Context) -> AgentResult:
        self.calls.append((request, ctx))
        if self.error is not None:
            raise self.error
        return AgentResult(self.answer, [], "stop", self.usage.model_copy(), Stats())


class Harness:
    def __init__(self, tmp_path: Path, delegate: FakeDelegate | None = None) -> None:
        self.model = ScriptedModel(SCRIPT["script"])
        self.requests = self.model.requests
        self.delegate = delegate or FakeDelegate()
        spec = build_tester_spec(tmp_path)
        self.guard, self.audit = governed(spec)
        self.loop = AgentLoop(
            spec,
            TOOLS,
            self.model,
            {"helper": DelegateTarget(description="Answers delegated tasks.", call=self.delegate)},
            self.guard,
        )

    def ask(self, text: str, ctx: Context | None = None, **extra: Any) -> AgentResult:
        request = ChatRequest.model_validate(
            {"model": "tester", "messages": [{"role": "user", "content": text}], **extra}
        )
        return run(self.loop.run(request, ctx or Context(request_id="req_test")))


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_plain_answer(harness: Harness) -> None:
    result = harness.ask("#plain hello")
    assert result.content == "one two three"
    assert result.tool_calls == []
    assert result.finish_reason == "stop"
    # prompt: "You serve Initech." (3) + "#plain hello" (2); completion: 3 words
    assert result.usage == Usage(prompt_tokens=5, completion_tokens=3)
    assert result.stats == Stats(turns=1)


def test_first_model_request(harness: Harness) -> None:
    harness.ask("#plain hello", metadata={"customer": "Globex"}, max_tokens=10, seed=4)
    (request,) = harness.requests
    assert request.agent == "tester"
    assert request.messages == [
        {"role": "system", "content": "You serve Globex."},
        {"role": "user", "content": "#plain hello"},
    ]
    assert [t["function"]["name"] for t in request.tools] == [
        "echo",
        "add",
        "boom",
        "slow",
        "delegate_to_helper",
    ]
    delegate = request.tools[-1]["function"]
    assert delegate["description"] == (
        "Delegate a task to the helper agent and get its answer. Answers delegated tasks."
    )
    assert delegate["parameters"]["required"] == ["task"]
    assert request.tool_choice == "auto"
    assert request.max_tokens == 10  # the request's limit wins over the manifest's 64
    assert request.temperature == 0.3  # the manifest's default
    assert request.seed == 4
    assert request.stream is False  # a non-streaming request asks for one unary model call


def test_every_model_call_samples_as_asked_and_carries_the_answers_format(harness: Harness) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "echo", "schema": {"type": "object"}}}
    sampling = {"presence_penalty": 0.5, "frequency_penalty": 0.1, "logit_bias": {"7": -5}, "top_p": 0.8}
    harness.ask("#echo hi", response_format=fmt, parallel_tool_calls=False, **sampling)
    assert len(harness.requests) == 2  # the tool call's turn, then the answer's
    for request in harness.requests:
        assert (request.presence_penalty, request.frequency_penalty, request.top_p) == (0.5, 0.1, 0.8)
        assert request.logit_bias == {7: -5} and request.parallel_tool_calls is False
        assert request.response_format is not None
        assert request.response_format.model_dump(by_alias=True, exclude_none=True) == fmt
    harness.ask("#plain", response_format={"type": "text"})
    assert harness.requests[-1].response_format is None  # text is no constraint
    assert harness.requests[-1].presence_penalty is None  # unset: the backend's default


def test_manifest_max_tokens_is_the_default(harness: Harness) -> None:
    harness.ask("#plain", temperature=1.5)
    assert harness.requests[0].max_tokens == 64
    assert harness.requests[0].temperature == 1.5


def test_server_tool_round_trip(harness: Harness) -> None:
    result = harness.ask("#echo hi")
    assert result.content == "echo said: hi"
    assert result.finish_reason == "stop"
    assert result.stats == Stats(turns=2, tool_calls=1)
    second = harness.requests[1].messages
    assert second[-2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0_0",
                "type": "function",
                "function": {"name": "echo", "arguments": '{"text": "hi"}'},
            }
        ],
    }
    assert second[-1] == {"role": "tool", "tool_call_id": "call_0_0", "content": "hi"}
    # turn 1: 5 prompt words, 2 argument words; turn 2: 5 + "hi" prompt words, 3 answer words
    assert result.usage == Usage(prompt_tokens=11, completion_tokens=5)


def test_parallel_tool_calls(harness: Harness) -> None:
    result = harness.ask("#parallel")
    assert result.content == "done"
    assert result.stats.tool_calls == 2
    tool_messages = [m for m in harness.requests[1].messages if m["role"] == "tool"]
    assert tool_messages == [
        {"role": "tool", "tool_call_id": "call_0_0", "content": "5"},
        {"role": "tool", "tool_call_id": "call_0_1", "content": "hi"},
    ]


def test_invalid_tool_arguments_are_told_to_the_model(harness: Harness) -> None:
    result = harness.ask("#invalid")
    assert result.content == (
        "after: error: invalid arguments for add: a: Input should be a valid integer, "
        "unable to parse string as an integer"
    )
    assert result.stats == Stats(turns=2, tool_calls=1, invalid_tool_calls=1)


def test_unknown_tool_is_told_to_the_model(harness: Harness) -> None:
    result = harness.ask("#unknown")
    assert result.content is not None
    assert result.content.startswith("after: error: the call to 'launch_missiles' was denied by policy (dec_")
    assert result.content.endswith(
        "launch_missiles is not a tool of tester; available tools: add, boom, delegate_to_helper, echo, slow"
    )
    assert result.stats == Stats(turns=2, tool_calls=1, invalid_tool_calls=1, denials=1)
    [denial] = [r for r in harness.audit.records if r["action"] == "tool:launch_missiles"]
    assert denial["outcome"] == "deny" and denial["decision_id"] in result.content


def test_failing_tool_is_told_to_the_model(harness: Harness) -> None:
    result = harness.ask("#fail")
    assert result.content == "after: error: boom failed: RuntimeError: disk on fire"
    assert result.stats == Stats(turns=2, tool_calls=1, tool_failures=1)


def test_slow_tool_uses_the_grant_timeout(harness: Harness) -> None:
    result = harness.ask("#slow")
    assert result.content == "after: error: slow timed out after 0.05s"
    assert result.stats.tool_failures == 1


def test_delegation(harness: Harness) -> None:
    ctx = Context(request_id="req_abc", chain=("ingress",))
    result = harness.ask("#delegate ask helper", ctx=ctx)
    assert result.content == "helper said: helper handled it"
    assert result.stats == Stats(turns=2, tool_calls=1, delegations=["helper"])
    ((request, child_ctx),) = harness.delegate.calls
    assert request == ChatRequest(
        model="helper", messages=[UserMessage(role="user", content="#delegate ask helper")]
    )
    # The loop passes its context on; the delegate's deployment adds its own name on entry.
    assert child_ctx == Context(request_id="req_abc", chain=("ingress",))
    # turn 1: 6 prompt / 4 argument words; turn 2: 9 prompt / 5 answer words; helper: 7 / 3
    assert result.usage == Usage(prompt_tokens=6 + 9 + 7, completion_tokens=4 + 5 + 3)


def test_delegate_usage_is_added(tmp_path: Path) -> None:
    free = Harness(tmp_path / "a", FakeDelegate(usage=Usage()))
    paid = Harness(tmp_path / "b", FakeDelegate(usage=Usage(prompt_tokens=100, completion_tokens=40)))
    base = free.ask("#delegate x").usage
    total = paid.ask("#delegate x").usage
    assert (total.prompt_tokens - base.prompt_tokens, total.completion_tokens - base.completion_tokens) == (
        100,
        40,
    )


def test_failing_delegate_is_a_tool_failure(tmp_path: Path) -> None:
    delegate = FakeDelegate()
    delegate.error = ModelError("engine down")
    result = Harness(tmp_path, delegate).ask("#delegate x")
    assert result.content == "helper said: error: agent 'helper' failed: engine down"
    assert result.stats == Stats(turns=2, tool_calls=1, tool_failures=1, delegations=["helper"])


def test_delegation_without_task_is_invalid(harness: Harness) -> None:
    result = harness.ask("#baddelegate")
    assert result.content.startswith("after: error: invalid arguments for delegate_to_helper: ")
    assert "task" in result.content
    assert result.stats == Stats(turns=2, tool_calls=1, invalid_tool_calls=1)
    assert harness.delegate.calls == []


def test_client_tool_call_ends_the_request(harness: Harness) -> None:
    result = harness.ask("#client", tools=[WEATHER_TOOL])
    assert result.finish_reason == "tool_calls"
    assert result.content is None
    assert result.tool_calls == [
        ToolCall(id="call_0_0", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    ]
    assert result.stats == Stats(turns=1)
    assert harness.requests[0].tools[-1] == WEATHER_TOOL


def test_client_tool_result_continues_the_conversation(harness: Harness) -> None:
    messages = [
        {"role": "user", "content": "#client"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0_0", "content": "sunny, 21C"},
    ]
    request = ChatRequest.model_validate({"model": "tester", "messages": messages, "tools": [WEATHER_TOOL]})
    result = run(harness.loop.run(request, Context(request_id="req_x")))
    assert result.content == "weather: sunny, 21C"
    assert result.finish_reason == "stop"


def test_mixed_server_and_client_calls(harness: Harness) -> None:
    result = harness.ask("#mixed", tools=[WEATHER_TOOL])
    assert result.finish_reason == "tool_calls"
    assert result.content == "checking"
    assert [c.function.name for c in result.tool_calls] == ["get_weather"]
    # The server-side echo of that turn is not run: its result could not reach the
    # client's next request, so the model calls it again then.
    assert result.stats.tool_calls == 0


@pytest.mark.parametrize(
    ("name", "param"), [("echo", "tools[0].function.name"), ("delegate_to_helper", None)]
)
def test_client_tool_name_collision(harness: Harness, name: str, param: str | None) -> None:
    other = {"type": "function", "function": {"name": "ok_tool"}}
    clash = {"type": "function", "function": {"name": name}}
    tools = [clash, other] if param else [other, clash]
    with pytest.raises(InvalidRequest) as info:
        harness.ask("#plain", tools=tools)
    assert info.value.param == (param or "tools[1].function.name")
    assert info.value.message == f"tool name {name!r} is reserved by agent 'tester'"
    assert harness.requests == []


def test_max_turns_exceeded(harness: Harness) -> None:
    with pytest.raises(MaxTurnsExceeded) as info:
        harness.ask("#loop")
    assert info.value.message == "agent 'tester' did not finish within max_turns=3"
    assert info.value.code == "max_turns_exceeded"
    assert len(harness.requests) == 3


def test_model_error_propagates(harness: Harness) -> None:
    with pytest.raises(ModelError, match="simulated engine failure"):
        harness.ask("#model-error")


def test_tool_choice_required_applies_to_the_first_call_only(harness: Harness) -> None:
    harness.ask("#echo hi", tool_choice="required")
    assert [r.tool_choice for r in harness.requests] == ["required", "auto"]


def test_named_tool_choice_applies_to_the_first_call_only(harness: Harness) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    result = harness.ask("#echo hi", tools=[WEATHER_TOOL], tool_choice=choice)
    assert result.content == "echo said: hi"
    assert [r.tool_choice for r in harness.requests] == [choice, "auto"]


def test_tool_choice_may_force_one_of_the_agents_own_tools(harness: Harness) -> None:
    choice = {"type": "function", "function": {"name": "echo"}}
    result = harness.ask("#echo hi", tool_choice=choice)
    assert result.content == "echo said: hi"
    assert [r.tool_choice for r in harness.requests] == [choice, "auto"]


def test_tool_choice_naming_a_missing_tool_is_a_400_naming_it(harness: Harness) -> None:
    choice = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(InvalidRequest) as info:
        harness.ask("#echo hi", tools=[WEATHER_TOOL], tool_choice=choice)
    assert info.value.param == "tool_choice"
    assert (
        info.value.message
        == "tool_choice names function 'nope', which is neither in tools nor a tool of agent 'tester'"
    )
    assert harness.requests == []


def test_tool_choice_none(harness: Harness) -> None:
    result = harness.ask("#echo hi", tool_choice="none")
    assert harness.requests[0].tool_choice == "none"
    assert result.stats == Stats(turns=1)
    assert result.finish_reason == "stop"
    assert result.content == ""


def test_system_prompt_from_metadata(harness: Harness) -> None:
    assert harness.ask("#system").content == "You serve Initech."
    assert harness.ask("#system", metadata={"customer": "Globex"}).content == "You serve Globex."


def test_events_stream_content_before_finished(harness: Harness) -> None:
    request = ChatRequest.model_validate(
        {"model": "tester", "messages": [{"role": "user", "content": "#plain"}]}
    )

    async def collect() -> list[Any]:
        return [e async for e in harness.loop.events(request, Context(request_id="req_e"))]

    events = run(collect())
    assert events[:-1] == [ContentDelta("one "), ContentDelta("two "), ContentDelta("three")]
    assert isinstance(events[-1], Finished)
    assert events[-1].result.content == "one two three"


def test_events_across_a_tool_round_trip(harness: Harness) -> None:
    request = ChatRequest.model_validate(
        {"model": "tester", "messages": [{"role": "user", "content": "#echo yo"}]}
    )

    async def collect() -> list[Any]:
        return [e async for e in harness.loop.events(request, Context(request_id="req_e"))]

    events = run(collect())
    assert [e.text for e in events if isinstance(e, ContentDelta)] == ["echo ", "said: ", "yo"]
    assert isinstance(events[-1], Finished)
    assert events[-1].result.stats.tool_calls == 1


def test_context() -> None:
    ctx = Context.new()
    assert ctx.request_id.startswith("req_") and len(ctx.request_id) == 36
    assert ctx.chain == ()
    assert ctx.enter("a").enter("b") == Context(request_id=ctx.request_id, chain=("a", "b"))


def test_last_turn_does_not_run_tools_nobody_would_read(harness: Harness) -> None:
    with pytest.raises(MaxTurnsExceeded):
        harness.ask("#loop")
    # max_turns=3: the calls of turns 1 and 2 ran; those of turn 3 had no turn left.
    assert len(harness.requests) == 3
    assert sum(1 for m in harness.requests[-1].messages if m["role"] == "tool") == 2


def test_the_loop_leaves_nothing_for_asyncio_to_finalize(harness: Harness) -> None:
    """The answer's generators are closed as the answer is returned: none is left to the
    garbage collector, whose finalizer would run it in a task of its own afterwards."""

    async def ask() -> set[asyncio.Task[Any]]:
        request = ChatRequest.model_validate(
            {"model": "tester", "messages": [{"role": "user", "content": "#delegate check the stock"}]}
        )
        result = await harness.loop.run(request, Context(request_id="req_test"))
        assert result.stats.delegations == ["helper"]
        await asyncio.sleep(0)  # a finalizer's task would have been created by now
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    assert run(ask()) == set()
