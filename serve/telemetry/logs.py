"""Fleet's own log lines, written the way Ray Serve writes a replica's.

Inside a replica, Ray Serve configures only its own logger (``ray.serve``): with the
deploy config's ``logging_config.encoding: JSON`` its handler writes JSON lines that
carry the request id, the application, the deployment and the replica. Fleet's loggers
(``fleet.*``) would otherwise fall to Python's last-resort handler on stderr, which Serve
turns into plain INFO lines of its own logger, below the configs' ``WARNING`` level:
dropped. :func:`route_to_serve` sends them through Serve's handlers at Serve's level.
"""

from __future__ import annotations

import logging

__all__ = ["FLEET_LOGGER", "route_to_serve"]

FLEET_LOGGER = "fleet"
SERVE_LOGGER = "ray.serve"


def route_to_serve() -> None:
    """Fleet's loggers write through this replica's Serve handlers (call in a replica)."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    fleet = logging.getLogger(FLEET_LOGGER)
    fleet.handlers = list(serve_logger.handlers)
    fleet.setLevel(serve_logger.level)
    fleet.propagate = not serve_logger.handlers  # outside a replica: as before
