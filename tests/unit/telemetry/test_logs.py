"""Fleet's log lines go through Ray Serve's replica handlers, at Serve's level."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from serve.telemetry.logs import route_to_serve


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def loggers() -> Iterator[tuple[logging.Logger, logging.Logger]]:
    serve_logger, fleet = logging.getLogger("ray.serve"), logging.getLogger("fleet")
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in (serve_logger, fleet)]
    yield serve_logger, fleet
    for lg, handlers, level, propagate in saved:
        lg.handlers, lg.propagate = handlers, propagate
        lg.setLevel(level)


def test_in_a_replica_fleet_lines_reach_serves_handler_at_its_level(
    loggers: tuple[logging.Logger, logging.Logger],
) -> None:
    serve_logger, _ = loggers
    kept = Keep()
    serve_logger.handlers = [kept]
    serve_logger.setLevel(logging.WARNING)
    route_to_serve()
    logging.getLogger("fleet.agent").error("agent %s failed", "hr")
    logging.getLogger("fleet.agent").info("quiet by default")
    assert [(r.name, r.getMessage()) for r in kept.records] == [("fleet.agent", "agent hr failed")]


def test_outside_a_replica_fleet_lines_propagate_as_before(
    loggers: tuple[logging.Logger, logging.Logger],
) -> None:
    serve_logger, fleet = loggers
    serve_logger.handlers = []
    route_to_serve()
    assert fleet.propagate and fleet.handlers == []
