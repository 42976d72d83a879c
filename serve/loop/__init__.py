"""The agent loop: the turn driver (runner), one server-side call (calls), the state a turn
carries as a value (state), its result types (results), governance as it sees it (guard)."""

from serve.loop.calls import CallResult, ServerCalls
from serve.loop.guard import Guard
from serve.loop.results import AgentResult, ContentDelta, DelegateTarget, Event, Finished, ModelCaller, Stats
from serve.loop.runner import AgentLoop
from serve.loop.state import LoopState

__all__ = [
    "AgentLoop",
    "AgentResult",
    "CallResult",
    "ContentDelta",
    "DelegateTarget",
    "Event",
    "Finished",
    "Guard",
    "LoopState",
    "ModelCaller",
    "ServerCalls",
    "Stats",
]
