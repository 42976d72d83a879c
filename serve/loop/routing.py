"""Routing: which delegate takes a request, decided before the agent's model speaks.

A small model offered its delegates as tools beside a plain answer almost always answers
(SmolLM2-135M under vLLM's ``anyOf`` schema delegated none of 15 questions), and asked to
name one as a constrained choice it named the same one for all 21 held-out questions.
An agent whose manifest has a ``routing`` section therefore routes its request first:

- ``mode: match`` (:class:`Matcher`): no model call. Each route is one document of words
  (the delegate's description, the routing description, the examples that take it); the
  user's message is scored against each with BM25 (``rank_bm25``) over Snowball stems of
  its content words. No clear winner (a tie, or no word in common) goes ``none``.
- ``mode: choose``: the model names one, as a constrained choice among the routes
  (``ModelRequest.choice``), from a prompt of its own (:func:`routing_messages`).

The loop then delegates the message to the chosen agent through the ordinary delegation
path (validation, the ``delegation`` decision, audit, span, stats); with ``answer:
delegate`` that reply is the answer (a handoff), with ``answer: model`` the model answers
from it as after any call.

Pure functions and values: the loop (:mod:`serve.loop.runner`) makes the calls.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import snowballstemmer
from rank_bm25 import BM25Okapi

from serve.manifest import DIRECT_ROUTE, Routing, RoutingExample, delegate_tool_name
from serve.protocol import FunctionCall, ToolCall

__all__ = [
    "ROUTING_MAX_TOKENS",
    "Matcher",
    "chosen",
    "delegation_call",
    "last_question",
    "routes",
    "routing_messages",
]

# A delegate's name is a few tokens; an upstream writes it inside a small JSON call.
ROUTING_MAX_TOKENS = 32
_DIRECT_DESCRIPTION = "none of them: greetings, small talk and general questions."


def routes(routing: Routing, delegates: Sequence[str]) -> list[str]:
    """The choices of the routing call: the delegates' names, then ``none`` if offered."""
    return [*delegates, DIRECT_ROUTE] if routing.direct else list(delegates)


_WORD = re.compile(r"[^\W_]+")
_STEMMER = snowballstemmer.stemmer("english")
# English function words: in a manifest of a few dozen lines, "of" or "is" can be one
# route's word alone and decide a question. Short on purpose: the `stop-words` package's
# 1,333 words drop "work", "order" and "home", which route HR and supply chain questions.
_FUNCTION_WORDS = frozenset(
    """a an the this that these those it its i me my we us our you your he him his she her
    they them their who whom whose what which when where why how is are was were be been
    being am do does did have has had can could may might must shall should will would of
    to in on at by for from with about as into than then so if or and but not no nor any
    some all each every there here just very too also s t""".split()
)


def words(text: str) -> list[str]:
    """``text`` as the matcher reads it: Snowball stems of its content words (``replicas``
    -> ``replica``), lower case, function words left out."""
    found = [w for w in _WORD.findall(text.lower()) if w not in _FUNCTION_WORDS]
    stems: list[str] = _STEMMER.stemWords(found)
    return stems


class Matcher:
    """Routing by words: the route whose document the message matches best (BM25).

    Built once per replica from the manifest; :meth:`choose` costs microseconds."""

    def __init__(self, routing: Routing, delegates: Mapping[str, str]) -> None:
        names = routes(routing, list(delegates))
        texts: dict[str, list[str]] = {name: [] for name in names}
        for name, description in delegates.items():
            texts[name] += [description, routing.descriptions.get(name, "")]
        for example in routing.examples:
            texts[example.route].append(example.question)
        self._names = names
        self._index = BM25Okapi([words(" ".join(texts[name])) for name in names])

    def scores(self, question: str) -> dict[str, float]:
        """Each route's score for ``question`` (what the span records)."""
        found = self._index.get_scores(words(question))
        return {name: round(float(score), 3) for name, score in zip(self._names, found, strict=True)}

    def choose(self, question: str) -> str | None:
        """The delegate for ``question``, or ``None`` (``none`` won, or no route stood out)."""
        ranked = sorted(self.scores(question).items(), key=lambda item: item[1], reverse=True)
        best, score = ranked[0]
        if score <= 0 or (len(ranked) > 1 and ranked[1][1] >= score) or best == DIRECT_ROUTE:
            return None
        return best


def _interleaved(examples: Sequence[RoutingExample], order: Sequence[str]) -> list[RoutingExample]:
    """The examples taken in turn from each route (a model leans to the label it saw last)."""
    queues = {route: [e for e in examples if e.route == route] for route in order}
    mixed: list[RoutingExample] = []
    while any(queues.values()):
        mixed.extend(queue.pop(0) for queue in queues.values() if queue)
    return mixed


def routing_messages(routing: Routing, delegates: Mapping[str, str], question: str) -> list[dict[str, Any]]:
    """The routing call's conversation. ``delegates``: name -> the delegate's own description."""
    options = routes(routing, list(delegates))
    lines = ["Choose the agent that should answer the user's message.", ""]
    lines += [f"{name}: {routing.descriptions.get(name, text)}" for name, text in delegates.items()]
    if routing.direct:
        lines.append(f"{DIRECT_ROUTE}: {_DIRECT_DESCRIPTION}")
    listed = ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1]
    lines += ["", f"Reply with one name only: {listed}."]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "\n".join(lines)}]
    for example in _interleaved(routing.examples, options):
        messages.append({"role": "user", "content": example.question})
        messages.append({"role": "assistant", "content": example.route})
    messages.append({"role": "user", "content": question})
    return messages


def last_question(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message (what is routed: not the history before it)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "".join(p.get("text", "") for p in content or () if isinstance(p, dict))
    return ""


def chosen(content: str, calls: Sequence[ToolCall], delegates: Sequence[str]) -> str | None:
    """The delegate a routing reply chose, or ``None`` (``none``, or no choice at all).

    A backend that does not constrain the reply (the scripted one plays its script) may
    answer by calling a delegate's tool instead of naming it: that call is the choice."""
    label = content.strip().strip("\"'.").lower()
    if label in delegates:
        return label
    tools = {delegate_tool_name(d): d for d in delegates}
    return next((tools[c.function.name] for c in calls if c.function.name in tools), None)


def delegation_call(agent: str, question: str) -> ToolCall:
    """The call the loop makes for the chosen delegate: the user's message is its task."""
    arguments = json.dumps({"task": question})
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=delegate_tool_name(agent), arguments=arguments),
    )
