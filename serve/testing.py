"""Test doubles for Fleet agents: an agent's loop with no cluster, no network and no model.

Everything named in ``__all__`` is public, for agent authors' tests as for Fleet's own:

- a scripted model: :class:`ScriptedModel` plays the ``scripted`` backend's rules (see
  :mod:`serve.models.scripted`) as the loop's model and keeps every request it was given;
  :func:`rule` and :func:`tool_call` write a rule in a line;
- tool doubles: :data:`echo`, :data:`add`, :data:`boom` (raises), :data:`slow` (outlives
  its timeout), and :func:`failing_tool` / :func:`slow_tool` for other names;
- a governed harness: :func:`governed` (a real :class:`AgentGuard` over the Rego policies)
  and :class:`GovernedAgent` (the loop under it), auditing to a :class:`MemorySink`;
- PII canaries (``CANARY_*``) and :func:`assert_no_canaries`, to prove redaction;
- :func:`wait_until` and :func:`wait_until_async`: wait on a condition with a deadline,
  never a fixed sleep.

For example::

    agent = GovernedAgent(
        load_agent("agents/my-agent"),
        ScriptedModel([rule("#echo", tool_call("echo", text="hi"), "echo said: {tool_result}")]),
        tools=[echo],
    )
    assert agent.ask_sync("#echo").content == "echo said: hi"
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from serve.budget import Price
from serve.context import Context
from serve.governance.config import GovernanceConfig, build_engines
from serve.governance.governor import Governor
from serve.governance.guard import AgentGuard
from serve.loop.results import AgentResult, DelegateTarget, ModelCaller
from serve.loop.runner import AgentLoop
from serve.manifest import AgentSpec
from serve.models.base import ModelChunk, ModelRequest
from serve.models.scripted import ScriptedBackend, ScriptedConfig, ScriptRule
from serve.protocol import ChatRequest
from serve.steps import Step
from serve.tools import Tool, tool

__all__ = [
    "CANARIES",
    "CANARY_CARD",
    "CANARY_EMAIL",
    "CANARY_IBAN",
    "CANARY_PHONE",
    "CANARY_SSN",
    "PROJECT_ROOT",
    "GovernedAgent",
    "MemorySink",
    "ScriptedModel",
    "add",
    "assert_no_canaries",
    "boom",
    "echo",
    "failing_tool",
    "governed",
    "rule",
    "scripted_backend",
    "slow",
    "slow_tool",
    "tool_call",
    "wait_until",
    "wait_until_async",
]

T = TypeVar("T")

# The checkout that holds this package: configs/policies, the default policies, is in it.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


# --- a scripted model ------------------------------------------------------------------


def rule(match: str, *replies: str | Mapping[str, Any], agent: str | None = None) -> ScriptRule:
    """A script rule: for a last user message where the regex ``match`` is found, play
    ``replies`` in order, one per model call (a string is a reply's ``content``)."""
    played = [{"content": r} if isinstance(r, str) else dict(r) for r in replies]
    return ScriptRule.model_validate({"agent": agent, "match": match, "replies": played})


def tool_call(name: str, **arguments: Any) -> dict[str, Any]:
    """A reply that calls one tool (arguments may use the script's ``{placeholders}``)."""
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def scripted_backend(
    rules: Iterable[ScriptRule | Mapping[str, Any]], words_per_chunk: int = 1
) -> ScriptedBackend:
    """The ``scripted`` backend playing ``rules``: :func:`rule` values, or mappings as in a
    deploy config's ``script`` list."""
    config = {"kind": "scripted", "script": list(rules), "words_per_chunk": words_per_chunk}
    return ScriptedBackend(ScriptedConfig.model_validate(config))


class ScriptedModel:
    """The loop's model (a :data:`~serve.loop.results.ModelCaller`) playing a script; every
    request it is given is kept in :attr:`requests`, in order."""

    def __init__(self, rules: Iterable[ScriptRule | Mapping[str, Any]], words_per_chunk: int = 1) -> None:
        self.backend = scripted_backend(rules, words_per_chunk)
        self.requests: list[ModelRequest] = []

    async def __call__(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        self.requests.append(request)
        async for chunk in self.backend.stream(request):
            yield chunk


# --- tool doubles ----------------------------------------------------------------------


@tool
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@tool
async def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def failing_tool(name: str = "boom", message: str = "disk on fire") -> Tool:
    """A tool that always raises ``RuntimeError(message)``: the model is told
    ``<name> failed: RuntimeError: <message>``."""

    def fail() -> str:
        raise RuntimeError(message)

    made: Tool = tool(fail, name=name, description="Always raises.")
    return made


def slow_tool(name: str = "slow", seconds: float = 5.0) -> Tool:
    """A tool that answers after ``seconds``: past its grant's ``timeout_s``, the model is
    told ``<name> timed out after <timeout>s``."""

    async def wait() -> str:
        await asyncio.sleep(seconds)  # the behaviour under test: it outlives its timeout
        return "too late"

    made: Tool = tool(wait, name=name, description="Takes longer than its timeout.")
    return made


boom = failing_tool()
slow = slow_tool()


# --- a governed harness ---------------------------------------------------------------


class MemorySink:
    """An audit sink that keeps what it is given (replicas ship to the audit service)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def step(self, step: Step, record: dict[str, Any]) -> None:
        """A governor's step: kept as the record the audit service would store."""
        self.events.append(record)


def governed(
    spec: AgentSpec,
    *,
    policies: Sequence[str] | None = None,
    shadow: Sequence[str] = (),
    root: Path = PROJECT_ROOT,
) -> tuple[AgentGuard, MemorySink]:
    """A real :class:`AgentGuard` for ``spec`` over the Rego policies (``configs/policies``
    unless ``policies`` names others; relative paths are under ``root``), and the sink
    its audit records land in."""
    config = GovernanceConfig(policies=list(policies or ["configs/policies"]), shadow=list(shadow))
    sink = MemorySink()
    engine, shadow_engine = build_engines(config, root, spec.manifest.policies.files)
    return AgentGuard(Governor(engine, shadow_engine, sink), spec), sink


class GovernedAgent:
    """An agent's :class:`AgentLoop` under real governance (see :func:`governed`), its model
    calls priced at ``price`` (None: they cost nothing).

    :attr:`audit` keeps the decisions (``records``) and steps (``events``) of every
    request; a :class:`ScriptedModel` keeps what the model was asked.
    """

    def __init__(
        self,
        spec: AgentSpec,
        model: ModelCaller,
        tools: Iterable[Tool] | Mapping[str, Tool] = (),
        delegates: Mapping[str, DelegateTarget] | None = None,
        *,
        builtin: Mapping[str, Tool] | None = None,
        policies: Sequence[str] | None = None,
        shadow: Sequence[str] = (),
        root: Path = PROJECT_ROOT,
        price: Price | None = None,
        parking: bool = False,
    ) -> None:
        by_name = dict(tools) if isinstance(tools, Mapping) else {t.name: t for t in tools}
        self.spec, self.model = spec, model
        self.guard, self.audit = governed(spec, policies=policies, shadow=shadow, root=root)
        self.loop = AgentLoop(
            spec, by_name, model, dict(delegates or {}), self.guard, builtin, price, parking=parking
        )

    def request(self, text: str, **extra: Any) -> ChatRequest:
        """A chat request to this agent with one user message (``extra``: other fields)."""
        body = {"model": self.spec.manifest.name, "messages": [{"role": "user", "content": text}], **extra}
        return ChatRequest.model_validate(body)

    async def ask(
        self, text: str, ctx: Context | None = None, history: list[dict[str, Any]] | None = None, **extra: Any
    ) -> AgentResult:
        """Run the loop on one user message; ``history``: earlier turns of a session."""
        return await self.loop.run(
            self.request(text, **extra), ctx or Context(request_id="req_test"), history
        )

    def ask_sync(
        self, text: str, ctx: Context | None = None, history: list[dict[str, Any]] | None = None, **extra: Any
    ) -> AgentResult:
        """:meth:`ask`, for a test that runs no event loop of its own."""
        return asyncio.run(self.ask(text, ctx, history, **extra))


# --- PII canaries ----------------------------------------------------------------------

# Values that look real to the detectors (serve.policy.pii) and are nobody's: a reserved
# domain, an SSN of a never-issued group, a card number for tests, the IBAN of the
# standard's own example, a 555-01xx number kept for fiction.
CANARY_EMAIL = "dana.canary@example.org"
CANARY_SSN = "219-09-9999"
CANARY_CARD = "4000 0566 5566 5556"  # Luhn-valid
CANARY_IBAN = "GB82 WEST 1234 5698 7654 32"  # mod-97 valid
CANARY_PHONE = "(415) 555-0134"
CANARIES: Mapping[str, str] = {
    "email": CANARY_EMAIL,
    "ssn": CANARY_SSN,
    "card": CANARY_CARD,
    "iban": CANARY_IBAN,
    "phone": CANARY_PHONE,
}


def assert_no_canaries(*texts: object, canaries: Mapping[str, str] = CANARIES) -> None:
    """Fail if any canary appears in ``texts``: strings, bytes, files (read whole) or any
    other value (as ``str()``: audit records, span attributes, log records)."""
    for i, item in enumerate(texts):
        text = _text_of(item)
        for kind, value in canaries.items():
            at = text.find(value)
            if at >= 0:
                where = str(item) if isinstance(item, Path) else f"text {i}"
                shown = text[max(at - 40, 0) : at + len(value) + 40]
                raise AssertionError(f"the {kind} canary {value!r} is in {where}: ...{shown}...")


def _text_of(item: object) -> str:
    if isinstance(item, Path):
        return item.read_text(encoding="utf-8", errors="replace")
    if isinstance(item, bytes | bytearray):
        return bytes(item).decode("utf-8", errors="replace")
    return item if isinstance(item, str) else str(item)


# --- waiting on conditions -------------------------------------------------------------


def wait_until(condition: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.05) -> T:
    """Call ``condition`` every ``interval_s`` until it returns something true; return that.

    An ``AssertionError`` from it means "not yet" (a condition may assert, and its last
    failure says why the wait ran out); any other exception ends the wait. After
    ``timeout_s``: ``TimeoutError``.
    """
    poll = _Poll(condition, timeout_s, time.monotonic)
    while not poll.held():
        time.sleep(interval_s)
    return poll.value


async def wait_until_async(
    condition: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.01
) -> T:
    """:func:`wait_until` inside an event loop: the loop runs while it waits."""
    poll = _Poll(condition, timeout_s, asyncio.get_running_loop().time)
    while not poll.held():  # noqa: ASYNC110 -- the condition is any state, not an event to await
        await asyncio.sleep(interval_s)
    return poll.value


class _Poll(Generic[T]):
    """One wait's deadline and its condition's last answer (sync and async waits share it)."""

    value: T  # the last answer, once there is one

    def __init__(self, condition: Callable[[], T], timeout_s: float, clock: Callable[[], float]) -> None:
        self._condition, self._timeout, self._clock = condition, timeout_s, clock
        self._deadline = clock() + timeout_s

    def held(self) -> bool:
        """Whether the condition holds now (its value in :attr:`value`); past the deadline, raise."""
        failure: AssertionError | None = None
        try:
            self.value = self._condition()
        except AssertionError as exc:
            failure = exc
        else:
            if self.value:
                return True
        if self._clock() >= self._deadline:
            raise self._timed_out(failure)
        return False

    def _timed_out(self, failure: AssertionError | None) -> TimeoutError:
        name = getattr(self._condition, "__qualname__", repr(self._condition))
        code = getattr(self._condition, "__code__", None)
        if "<lambda>" in name and code is not None:
            name = f"the condition at {Path(code.co_filename).name}:{code.co_firstlineno}"
        last = f"failed: {failure}" if failure is not None else f"last returned {self.value!r:.300}"
        error = TimeoutError(f"{name} did not hold within {self._timeout:g}s ({last})")
        error.__cause__ = failure
        return error
