"""serve.testing, the public test doubles: scripted model, tools, governed harness, canaries, waits."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from serve.errors import ToolError
from serve.manifest import load_agent
from serve.policy.pii import scan
from serve.testing import (
    CANARIES,
    GovernedAgent,
    ScriptedModel,
    add,
    assert_no_canaries,
    boom,
    echo,
    failing_tool,
    rule,
    slow,
    slow_tool,
    tool_call,
    wait_until,
    wait_until_async,
)
from tests.unit.conftest import run, write_agent


def test_the_module_docstring_example_runs(tmp_path: Path) -> None:
    folder = write_agent(
        tmp_path, "my-agent", tools=[{"name": "echo", "scope": "test.run"}], scopes=["test.run"]
    )
    agent = GovernedAgent(
        load_agent(folder),
        ScriptedModel([rule("#echo", tool_call("echo", text="hi"), "echo said: {tool_result}")]),
        tools=[echo],
    )
    assert agent.ask_sync("#echo").content == "echo said: hi"
    assert isinstance(agent.model, ScriptedModel) and len(agent.model.requests) == 2
    assert [(r["action"], r["outcome"]) for r in agent.audit.records][1] == ("tool:echo", "allow")


def test_a_scripted_model_plays_its_rules_and_keeps_the_requests(tmp_path: Path) -> None:
    spec = load_agent(write_agent(tmp_path, "plain"))
    model = ScriptedModel([rule("#first", "one", "two"), {"match": "", "replies": [{"content": "any"}]}])
    agent = GovernedAgent(spec, model)
    assert run(agent.ask("#first")).content == "one"
    assert run(agent.ask("something else", metadata={"customer": "Globex"})).content == "any"
    assert model.requests[-1].messages[0] == {"role": "system", "content": "You serve Globex."}


def test_tool_doubles() -> None:
    assert run(echo.run('{"text": "hi"}', 1)) == "hi"
    assert run(add.run({"a": 2, "b": 3}, 1)) == "5"
    with pytest.raises(ToolError, match=r"^boom failed: RuntimeError: disk on fire$"):
        run(boom.run("{}", 1))
    with pytest.raises(ToolError, match=r"^slow timed out after 0.01s$"):
        run(slow.run("{}", 0.01))
    assert failing_tool("fail").name == "fail" and slow_tool("wait", 1).name == "wait"


def test_the_canaries_are_what_the_detectors_find() -> None:
    for kind, value in CANARIES.items():
        assert [f.kind for f in scan(f"see {value}.")] == [kind]


def test_assert_no_canaries_names_the_kind_and_where(tmp_path: Path) -> None:
    log = tmp_path / "fleet.log"
    log.write_text("request done\n")
    assert_no_canaries("clean", b"bytes too", {"record": "[REDACTED:email]"}, log)
    log.write_text(f"user {CANARIES['iban']} paid\n")
    with pytest.raises(AssertionError, match=rf"the iban canary .* is in {log}"):
        assert_no_canaries("clean", log)
    with pytest.raises(AssertionError, match=r"the email canary .* is in text 1"):
        assert_no_canaries("clean", [{"to": CANARIES["email"]}])


def test_wait_until_returns_the_first_true_value() -> None:
    values = iter([0, None, 7])
    assert wait_until(lambda: next(values), timeout_s=5, interval_s=0) == 7


def test_wait_until_retries_a_failing_assertion_and_reports_the_last() -> None:
    calls = itertools.count()

    def ready() -> int:
        n = next(calls)
        assert n >= 2, f"only {n}"
        return n

    assert wait_until(ready, timeout_s=5, interval_s=0) == 2

    def never() -> bool:
        raise AssertionError("no")

    with pytest.raises(TimeoutError, match=r"never did not hold within 0.01s \(failed: no\)$") as info:
        wait_until(never, timeout_s=0.01, interval_s=0)
    assert isinstance(info.value.__cause__, AssertionError)


def test_wait_until_names_a_lambda_by_its_line_and_lets_other_errors_through() -> None:
    with pytest.raises(TimeoutError, match=r"the condition at test_testing.py:\d+ .*last returned False"):
        wait_until(lambda: False, timeout_s=0.01, interval_s=0)
    with pytest.raises(ZeroDivisionError):
        wait_until(lambda: 1 / 0, timeout_s=5)


def test_wait_until_async_lets_the_loop_run() -> None:
    async def scenario() -> str:
        done = asyncio.Event()
        asyncio.get_running_loop().call_soon(done.set)
        assert await wait_until_async(done.is_set, timeout_s=5)
        with pytest.raises(TimeoutError):
            await wait_until_async(lambda: False, timeout_s=0.01)
        return "ok"

    assert run(scenario()) == "ok"
