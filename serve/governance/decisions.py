"""What a decision point answers: a :class:`Decision`, and the :class:`Refusal` the model is told."""

from __future__ import annotations

from dataclasses import dataclass

from serve.policy.schema import Outcome, Point

__all__ = ["REDACTING_POINTS", "Decision", "Refusal"]

REDACTING_POINTS = frozenset({"model_input", "model_output", "data"})


@dataclass(frozen=True)
class Decision:
    id: str
    point: Point
    outcome: Outcome
    reasons: list[str]
    policy: str
    version: str

    @property
    def allowed(self) -> bool:
        """Whether the step may go on; ``redact`` only where there is content to redact."""
        return self.outcome == "allow" or (self.outcome == "redact" and self.point in REDACTING_POINTS)


@dataclass(frozen=True)
class Refusal:
    """A call governance did not let run, and what the model is told."""

    outcome: str  # "deny" or "escalate"
    message: str
