"""Telemetry: traces (OpenTelemetry), metrics (Prometheus through Ray), alert rules and dashboards."""

from serve.telemetry.traces import (
    attributes,
    carrier,
    content_capture,
    parent,
    setup_tracing,
    trace_id,
    tracer,
)

__all__ = ["attributes", "carrier", "content_capture", "parent", "setup_tracing", "trace_id", "tracer"]
