"""The loop's state between model calls, as a value: what parking a turn stores and resuming it reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter

from serve.budget.purse import Purse
from serve.loop.results import Stats
from serve.protocol import ToolCall, Usage

__all__ = ["LoopState"]


@dataclass(slots=True)
class LoopState:
    """Everything the turn driver carries from one model call to the next.

    A dataclass, not a pydantic model: the driver builds one per request and changes it
    every turn, where a model's construction and assignments cost several times more.
    Its JSON goes through a pydantic schema all the same (:meth:`to_json`,
    :meth:`from_json`), which validates what it reads. Built, it does not copy what it is
    given: the messages are the very dicts the guard redacts in place (the request's own
    among them, for the transcript).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    messages: Annotated[
        list[dict[str, Any]],
        Field(
            description="The conversation as the model sees it: system prompt, history, the request, "
            "then each turn's assistant message and tool results."
        ),
    ]
    asked: Annotated[
        list[dict[str, Any]],
        Field(description="The request's own messages (the transcript's start), as the model saw them."),
    ]
    seen: Annotated[
        int, Field(ge=0, description="How many of `messages` the guard has decided on already.")
    ] = 0
    turn: Annotated[int, Field(ge=0, description="The turn under way (1 for the first model call).")] = 0
    tool_choice: Annotated[
        str | dict[str, Any],
        Field(description="The tool choice of the next model call (the request's for the first only)."),
    ] = "auto"
    stats: Annotated[Stats, Field(description="Counts the answer reports (turns, tool calls, ...).")] = field(
        default_factory=Stats
    )
    usage: Annotated[Usage, Field(description="Model tokens spent so far, delegates' included.")] = field(
        default_factory=Usage
    )
    said: Annotated[
        list[str], Field(description="What the model said so far, as the client sees it: one text per turn.")
    ] = field(default_factory=list)
    pending: Annotated[
        list[ToolCall], Field(description="The calls the model asked for this turn, not yet answered.")
    ] = field(default_factory=list)
    answered: Annotated[
        dict[str, str],
        Field(description="Results of this turn's calls that ran, by call id, while others wait for people."),
    ] = field(default_factory=dict)
    routed: Annotated[
        bool, Field(description="The pending call is the request's routing, whose answer is the delegate's.")
    ] = False
    purse: Annotated[
        Purse, Field(description="What the request may still spend here, and what it spent and holds.")
    ] = field(default_factory=Purse)

    def text(self) -> str:
        """Everything the model said, as one answer."""
        return "".join(self.said)

    def to_json(self) -> bytes:
        return _JSON.dump_json(self)

    @classmethod
    def from_json(cls, data: str | bytes) -> LoopState:
        """A state from its JSON, validated (a stored state is read back as any input is)."""
        return _JSON.validate_json(data)


_JSON: TypeAdapter[LoopState] = TypeAdapter(LoopState)
