"""The agent loop with memory: session history, the transcript, and the built-in memory tools.

The memory deployment is a fake handle (every method has a ``.remote`` returning a
coroutine); governance is the real AgentGuard over configs/policies, audited to a MemorySink.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError
from ray.serve.handle import DeploymentHandle

from serve.context import Context
from serve.errors import ConfigError, InvalidRequest
from serve.governance.guard import AgentGuard
from serve.loop.results import AgentResult
from serve.loop.runner import AgentLoop
from serve.manifest import AgentManifest, load_agent
from serve.memory.client import RequestMemory, bind, memory, unbind
from serve.memory.tools import MEMORY_TOOLS
from serve.policy.schema import Principal
from serve.protocol import ChatRequest
from serve.testing import CANARY_EMAIL, MemorySink, ScriptedModel, governed
from tests.unit.conftest import manifest, run, write_agent

ACME = Principal(tenant="acme", roles=["qa"], authenticated=True)

SCRIPT: dict[str, Any] = {
    "kind": "scripted",
    "script": [
        {"match": "#previous", "replies": [{"content": "before: {previous}"}]},
        {"match": "#repeat", "replies": [{"content": "you said: {input}"}]},
        {
            "match": r"#recall (?P<ns>\S+)",
            "replies": [
                {"tool_calls": [{"name": "recall", "arguments": {"namespace": "{ns}", "key": "deadline"}}]},
                {"content": "recalled: {tool_result}"},
            ],
        },
        {
            "match": r"#remember",
            "replies": [
                {
                    "tool_calls": [
                        {
                            "name": "remember",
                            "arguments": {"namespace": "qa", "key": "deadline", "text": "Monday"},
                        }
                    ]
                },
                {"content": "after: {tool_result}"},
            ],
        },
        {
            "match": r"#search",
            "replies": [
                {
                    "tool_calls": [
                        {"name": "search_memory", "arguments": {"namespace": "qa", "query": "release"}}
                    ]
                },
                {"content": "found: {tool_result}"},
            ],
        },
        {
            "match": "#share",
            "replies": [
                {
                    "tool_calls": [
                        {"name": "write_context", "arguments": {"key": "finding", "value": "42 widgets"}}
                    ]
                },
                {"tool_calls": [{"name": "read_context", "arguments": {"key": "finding"}}]},
                {"content": "read back: {tool_result}"},
            ],
        },
    ],
}


class _Method:
    """``handle.<method>``: its ``.remote(*args)`` is awaitable, as a DeploymentResponse is."""

    def __init__(self, impl: Callable[..., Coroutine[Any, Any, Any]]) -> None:
        self._impl = impl

    def remote(self, *args: Any) -> Coroutine[Any, Any, Any]:
        return self._impl(*args)


class FakeMemoryService:
    """Stands in for the memory deployment's handle; records every call it gets."""

    def __init__(self, facts: dict[tuple[str, str, str], str] | None = None) -> None:
        self.facts = dict(facts or {})
        self.contexts: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.hang = False  # never answer (a wedged replica)
        self.error: Exception | None = None  # fail (a replica that died)
        self.put_context = _Method(self._put_context)
        self.context = _Method(self._context)
        self.put_fact = _Method(self._put_fact)
        self.fact = _Method(self._fact)
        self.search_facts = _Method(self._search_facts)

    async def _answer(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error

    async def _put_context(self, tenant: str, request: str, key: str, value: Any) -> str | None:
        await self._answer("put_context", tenant, request, key, value)
        self.contexts.setdefault((tenant, request), {})[key] = value
        return None

    async def _context(self, tenant: str, request: str) -> dict[str, Any]:
        await self._answer("context", tenant, request)
        return dict(self.contexts.get((tenant, request), {}))

    async def _put_fact(self, tenant: str, namespace: str, key: str, text: str) -> str | None:
        await self._answer("put_fact", tenant, namespace, key, text)
        self.facts[(tenant, namespace, key)] = text
        return None

    async def _fact(self, tenant: str, namespace: str, key: str) -> str | None:
        await self._answer("fact", tenant, namespace, key)
        return self.facts.get((tenant, namespace, key))

    async def _search_facts(
        self, tenant: str, namespace: str, query: str, limit: int
    ) -> list[tuple[str, str]]:
        await self._answer("search_facts", tenant, namespace, query, limit)
        return [
            (k, text)
            for (t, ns, k), text in self.facts.items()
            if (t, ns) == (tenant, namespace) and query.lower() in text.lower()
        ][:limit]


class Clerk:
    """An agent with the memory tools on, its guard and audit sink, and what its model saw."""

    def __init__(self, tmp_path: Path, scopes: list[str] | None = None) -> None:
        folder = write_agent(
            tmp_path,
            "clerk",
            scopes=["memory:qa:read"] if scopes is None else scopes,
            memory={"tools": True},
            max_turns=4,
        )
        spec = load_agent(folder)
        guard, sink = governed(spec)
        self.guard: AgentGuard = guard
        self.sink: MemorySink = sink
        self.model = ScriptedModel(SCRIPT["script"])
        self.requests = self.model.requests
        self.service = FakeMemoryService({("acme", "qa", "deadline"): "the release is on Friday"})
        self.ctx: Context | None = None
        self.loop = AgentLoop(spec, {}, self.model, {}, self.guard, builtin=MEMORY_TOOLS)

    def ask(
        self,
        text: str,
        history: list[dict[str, Any]] | None = None,
        principal: Principal | None = ACME,
        timeout_s: float = 2.0,
        **extra: Any,
    ) -> AgentResult:
        request = ChatRequest.model_validate(
            {"model": "clerk", "messages": [{"role": "user", "content": text}], **extra}
        )
        self.ctx = ctx = self.guard.enter(Context.new("req_mem", principal))
        handle = cast("DeploymentHandle[Any]", self.service)

        async def serve() -> AgentResult:  # as serve/agent.py does around one request
            token = bind(RequestMemory(handle, ctx, self.guard.memory, timeout_s))
            try:
                return await self.loop.run(request, ctx, history)
            finally:
                unbind(token)

        return run(serve())

    def memory_records(self) -> list[tuple[str, str]]:
        return [(r["action"], r["outcome"]) for r in self.sink.records if r["point"] == "memory"]


@pytest.fixture
def clerk(tmp_path: Path) -> Clerk:
    return Clerk(tmp_path)


def said(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": text}


# --- session history and the transcript -------------------------------------------------


def test_history_goes_between_the_system_prompt_and_the_request(clerk: Clerk) -> None:
    history = [said("user", "what is the deadline?"), said("assistant", "Friday.")]
    result = clerk.ask("#previous what did I ask?", history=history)
    assert result.content == "before: what is the deadline?"  # the model read the earlier turn
    [request] = clerk.requests
    assert request.messages == [
        {"role": "system", "content": "You serve Initech."},
        said("user", "what is the deadline?"),
        said("assistant", "Friday."),
        said("user", "#previous what did I ask?"),
    ]


def test_transcript_holds_the_redacted_request_and_the_answer_without_history(clerk: Clerk) -> None:
    history = [said("user", "hello"), said("assistant", "hi")]
    result = clerk.ask(f"#repeat write to {CANARY_EMAIL}", history=history)
    assert result.content == "you said: #repeat write to [REDACTED:email]"
    assert result.transcript == [
        said("user", "#repeat write to [REDACTED:email]"),
        said("assistant", "you said: #repeat write to [REDACTED:email]"),
    ]
    assert CANARY_EMAIL not in str(result.transcript)  # a session never stores what the model may not see
    assert CANARY_EMAIL not in str(clerk.requests[0].messages)


def test_transcript_of_a_tool_using_request_is_the_request_and_the_final_answer(clerk: Clerk) -> None:
    result = clerk.ask("#recall qa")
    assert result.transcript == [
        said("user", "#recall qa"),
        said("assistant", "recalled: the release is on Friday"),
    ]


# --- the built-in memory tools ----------------------------------------------------------


def test_memory_tools_are_offered_to_the_model(clerk: Clerk) -> None:
    clerk.ask("#repeat hi")
    offered = {t["function"]["name"]: t["function"] for t in clerk.requests[0].tools}
    assert set(offered) == set(MEMORY_TOOLS)
    assert offered["recall"]["parameters"]["required"] == ["namespace", "key"]


def test_client_tool_cannot_take_a_memory_tools_name(clerk: Clerk) -> None:
    spoof = {"type": "function", "function": {"name": "recall", "parameters": {"type": "object"}}}
    with pytest.raises(InvalidRequest, match="tool name 'recall' is reserved"):
        clerk.ask("#repeat hi", tools=[spoof])


def test_recall_in_a_granted_namespace_is_decided_at_the_memory_point(clerk: Clerk) -> None:
    result = clerk.ask("#recall qa")
    assert result.content == "recalled: the release is on Friday"
    assert clerk.service.calls == [("fact", ("acme", "qa", "deadline"))]  # keyed by the caller's tenant
    assert clerk.memory_records() == [("memory:read:facts:qa", "allow")]
    assert [r for r in clerk.sink.records if r["point"] == "tool"] == []  # not the tool point
    assert result.stats.tool_calls == 1 and result.stats.tool_failures == 0


def test_recall_in_a_namespace_not_granted_is_refused_and_audited(clerk: Clerk) -> None:
    result = clerk.ask("#recall hr")
    content = result.content or ""
    assert content.startswith("recalled: error: the memory read of facts:hr was denied by policy (dec_")
    assert "memory:hr:read is not granted to clerk" in content
    assert clerk.service.calls == []  # the service was never asked
    [record] = [r for r in clerk.sink.records if r["point"] == "memory"]
    assert (record["action"], record["outcome"], record["enforced"]) == ("memory:read:facts:hr", "deny", True)
    assert record["tenant"] == "acme" and record["decision_id"] in content
    tool_results = [m for m in clerk.requests[1].messages if m["role"] == "tool"]
    assert ["memory:hr:read is not granted" in m["content"] for m in tool_results] == [True]
    assert (result.stats.denials, result.stats.tool_failures) == (1, 0)  # a refusal, not a failure


def test_read_scope_does_not_grant_writes(clerk: Clerk) -> None:
    result = clerk.ask("#remember")
    assert "memory:qa:write is not granted to clerk" in (result.content or "")
    assert clerk.service.facts[("acme", "qa", "deadline")] == "the release is on Friday"  # unchanged
    assert clerk.memory_records() == [("memory:write:facts:qa", "deny")]


def test_write_scope_lets_the_agent_remember(tmp_path: Path) -> None:
    clerk = Clerk(tmp_path, scopes=["memory:qa:read", "memory:qa:write"])
    result = clerk.ask("#remember")
    assert result.content == "after: remembered qa/deadline"
    assert clerk.service.facts[("acme", "qa", "deadline")] == "Monday"
    assert clerk.memory_records() == [("memory:write:facts:qa", "allow")]


def test_the_api_keys_scopes_narrow_memory_too(clerk: Clerk) -> None:
    narrow = Principal(tenant="acme", roles=["qa"], authenticated=True, scopes=["something.else"])
    result = clerk.ask("#recall qa", principal=narrow)
    assert "memory:qa:read is not granted to clerk" in (result.content or "")
    assert clerk.service.calls == []


def test_search_memory_reads_the_namespace(clerk: Clerk) -> None:
    result = clerk.ask("#search")
    assert result.content == "found: qa/deadline: the release is on Friday"
    assert clerk.service.calls == [("search_facts", ("acme", "qa", "release", 5))]
    assert clerk.memory_records() == [("memory:read:facts:qa", "allow")]


def test_invalid_namespace_is_told_to_the_model_before_any_decision(clerk: Clerk) -> None:
    result = clerk.ask("#recall Bad!")
    assert (result.content or "").startswith("recalled: error: invalid arguments for recall: namespace:")
    assert clerk.service.calls == [] and clerk.memory_records() == []
    assert result.stats.invalid_tool_calls == 1


def test_shared_context_round_trips_within_the_request(clerk: Clerk) -> None:
    result = clerk.ask("#share")
    assert result.content == "read back: 42 widgets"
    # Keyed by the request tree's own id, not the request id a client may choose (and reuse).
    assert clerk.service.contexts == {("acme", clerk.ctx.tree): {"finding": "42 widgets"}}
    assert clerk.ctx.tree.startswith("tree_") and clerk.ctx.tree != clerk.ctx.request_id
    assert [name for name, _ in clerk.service.calls] == ["put_context", "context"]
    assert clerk.memory_records() == [("memory:write:context", "allow"), ("memory:read:context", "allow")]


def test_without_a_principal_memory_is_the_anonymous_tenants(clerk: Clerk) -> None:
    clerk.ask("#share", principal=None)
    assert list(clerk.service.contexts) == [("anonymous", clerk.ctx.tree)]


# --- an unavailable memory service ------------------------------------------------------


@pytest.mark.timeout(10)
def test_a_memory_service_that_does_not_answer_is_a_tool_error(clerk: Clerk) -> None:
    clerk.service.hang = True
    result = clerk.ask("#recall qa", timeout_s=0.05)
    assert result.content == "recalled: error: the memory service did not answer within 0.05s"
    assert result.finish_reason == "stop"
    assert result.stats.tool_failures == 1


def test_a_memory_service_that_fails_is_a_tool_error(clerk: Clerk) -> None:
    clerk.service.error = RuntimeError("replica died")
    result = clerk.ask("#share")
    assert result.content == "read back: error: the memory service is unavailable (RuntimeError)"
    assert result.stats.tool_failures == 2  # both the write and the read


def test_memory_outside_a_request_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="only while an agent serves a request"):
        memory()


# --- the manifest -----------------------------------------------------------------------


def test_manifest_tool_may_not_take_a_memory_tools_name_when_they_are_on() -> None:
    data = manifest("clerk", tools=[{"name": "remember", "scope": "s"}], scopes=["s"], memory={"tools": True})
    with pytest.raises(ValidationError) as err:
        AgentManifest.model_validate(data)
    assert "tools: ['remember'] are the memory tools' names" in str(err.value)
    data["memory"] = {"tools": False}  # off: the name is free
    assert AgentManifest.model_validate(data).tools[0].name == "remember"


def test_loading_such_an_agent_names_the_tools_field(tmp_path: Path) -> None:
    folder = write_agent(
        tmp_path, "clerk", tools=[{"name": "recall", "scope": "s"}], scopes=["s"], memory={"tools": True}
    )
    with pytest.raises(ConfigError) as err:
        load_agent(folder)
    assert err.value.field == "tools"
    assert "['recall'] are the memory tools' names" in str(err.value)
