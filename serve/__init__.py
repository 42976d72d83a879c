"""Fleet's runtime: enterprise AI agents as Ray Serve deployments.

What agent authors import is small: the :func:`tool` decorator (and :class:`Tool`) for
``tools.py``, :func:`memory` for the request's shared memory inside a tool, and the
error tree (:mod:`serve.errors`). Tests import their doubles from :mod:`serve.testing`;
everything else is wired by the app builder (``serve.app:build_app``).

Importing this package stays cheap: none of these imports Ray or a model engine.
"""

from serve.errors import (
    AgentError,
    ApprovalRequired,
    AuditUnavailable,
    ConfigError,
    FleetError,
    InvalidRequest,
    InvalidToolArguments,
    MaxTurnsExceeded,
    MemoryDenied,
    MemoryUnavailable,
    ModelError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PolicyDenied,
    RequestError,
    Signal,
    Timeout,
    ToolDenied,
    ToolError,
    Unauthorized,
)

# The function, not the subpackage: once this runs, ``serve.memory`` is ``memory()``
# (``from serve.memory.client import ...`` and the like still find the subpackage).
from serve.memory.client import memory
from serve.tools import Tool, tool

__all__ = [
    "AgentError",
    "ApprovalRequired",
    "AuditUnavailable",
    "ConfigError",
    "FleetError",
    "InvalidRequest",
    "InvalidToolArguments",
    "MaxTurnsExceeded",
    "MemoryDenied",
    "MemoryUnavailable",
    "ModelError",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "PolicyDenied",
    "RequestError",
    "Signal",
    "Timeout",
    "Tool",
    "ToolDenied",
    "ToolError",
    "Unauthorized",
    "memory",
    "tool",
]
