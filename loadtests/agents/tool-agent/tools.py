"""The benchmark's tool: does nothing, so the rung measures Fleet's tool round trip."""

from serve.tools import tool


@tool
def noop() -> str:
    """Return at once."""
    return "done"
