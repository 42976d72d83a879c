"""Fleet's runtime: enterprise AI agents as Ray Serve deployments.

What agent authors import is small: the :func:`tool` decorator (and :class:`Tool`) for
``tools.py``; everything else is wired by the app builder (``serve.app:build_app``).
"""

from serve.errors import ConfigError, FleetError, RequestError, ToolError
from serve.tools import Tool, tool

__all__ = ["ConfigError", "FleetError", "RequestError", "Tool", "ToolError", "tool"]
