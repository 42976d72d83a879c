"""The agent loop: the turn driver (runner), its result types (results), governance as it sees it (guard)."""

from serve.loop.guard import Guard
from serve.loop.results import AgentResult, ContentDelta, DelegateTarget, Event, Finished, ModelCaller, Stats
from serve.loop.runner import AgentLoop

__all__ = [
    "AgentLoop",
    "AgentResult",
    "ContentDelta",
    "DelegateTarget",
    "Event",
    "Finished",
    "Guard",
    "ModelCaller",
    "Stats",
]
