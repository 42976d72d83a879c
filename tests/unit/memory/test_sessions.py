"""Sessions through an agent (no Ray): a session is readable only by the principal that wrote it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from serve.agent import AgentDeployment
from serve.auth import TenantKey, hash_key, identify
from serve.context import Context
from serve.governance.config import GovernanceConfig
from serve.loop.results import AgentResult
from serve.memory.client import session_of
from serve.memory.store import MemoryLimits, SqliteStore
from serve.models.scripted import ScriptedConfig
from serve.protocol import ChatRequest
from tests.unit.audit.test_client import FlakyService
from tests.unit.conftest import ROOT, run, write_agent

TENANTS = [TenantKey(tenant="acme", key_sha256=hash_key(k), roles=["qa"]) for k in ("fk-ann", "fk-bob")]
# The model says what it was told before: the session's earlier user message, if any.
ECHO = ScriptedConfig.model_validate(
    {"kind": "scripted", "script": [{"replies": [{"content": "earlier: {previous}"}]}]}
)


class Memory:
    """The memory deployment's handle, in process, over a real store."""

    def __init__(self, store: SqliteStore) -> None:
        async def session(*key: str) -> list[dict[str, Any]]:
            return store.session(*key)

        async def append_session(*args: Any) -> None:
            store.append_session(*args)

        self.session = SimpleNamespace(remote=session)
        self.append_session = SimpleNamespace(remote=append_session)


async def ask(agent: AgentDeployment, key: str | None, text: str, tenants: list[TenantKey] = TENANTS) -> str:
    principal, principal_id = identify(f"Bearer {key}" if key else None, tenants)
    ctx = Context.new(principal=principal, session="s1", principal_id=principal_id)
    request = ChatRequest.model_validate({"model": "clerk", "messages": [{"role": "user", "content": text}]})
    outcome = await agent.chat(request, ctx)
    assert isinstance(outcome, AgentResult), outcome
    return outcome.content


def clerk(tmp_path: Path, store: SqliteStore) -> AgentDeployment:
    write_agent(tmp_path, "clerk", policies={"pii": "allow"})
    return AgentDeployment(
        str(tmp_path), "clerk", ECHO, {}, GovernanceConfig(), str(ROOT), FlakyService(), Memory(store),  # type: ignore[arg-type]
    )  # fmt: skip


def test_another_key_of_the_same_tenant_gets_an_empty_history(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "memory.db", MemoryLimits())

    async def scenario() -> list[str]:
        agent = clerk(tmp_path, store)
        return [
            await ask(agent, "fk-ann", "my plan is X"),
            await ask(agent, "fk-ann", "and then?"),  # ann's own session goes on
            await ask(agent, "fk-bob", "what was the plan?"),  # same tenant, same session id
            await ask(agent, "fk-ann", "again?"),  # bob's turn is not in ann's
        ]

    assert run(scenario()) == ["earlier: ", "earlier: my plan is X", "earlier: ", "earlier: and then?"]


def test_a_session_key_holds_the_principal_id() -> None:
    ann, _ = identify("Bearer fk-ann", TENANTS)
    ctx = Context.new(principal=ann, session="s1", principal_id="acme:" + hash_key("fk-ann")[:16])
    assert session_of(ctx) == f"acme:{hash_key('fk-ann')[:16]}/s1"
    assert session_of(Context.new(session="s1")) == "anonymous/s1"


def test_with_auth_off_every_caller_is_the_anonymous_principal(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "memory.db", MemoryLimits())

    async def scenario() -> list[str]:
        agent = clerk(tmp_path, store)
        return [await ask(agent, None, "first", tenants=[]), await ask(agent, None, "second", tenants=[])]

    assert run(scenario()) == ["earlier: ", "earlier: first"]
    assert store.session("anonymous", "clerk", "anonymous/s1") != []
