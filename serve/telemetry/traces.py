"""Traces: OpenTelemetry, configured by the standard ``OTEL_*`` variables.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_TRACES_EXPORTER=otlp`` /
``console``) or ``FLEET_TRACES_FILE`` (spans as JSON lines, for local use) is set in the
replicas' environment; otherwise the OpenTelemetry API's no-op tracer is all there is.
Sampling follows ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``; the service name
``OTEL_SERVICE_NAME`` (default ``fleet``).

Spans follow the GenAI semantic conventions: ``invoke_agent <agent>``, ``chat <model>``,
``execute_tool <tool>`` (a delegation is a tool call whose child is the delegate's
``invoke_agent`` span, in another replica). The trace context crosses deployment handles
inside :class:`serve.context.Context` as W3C ``traceparent``. Prompt and completion text are
recorded only with ``FLEET_TRACE_CONTENT=1`` (and then after PII redaction).
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from serve.settings import settings

__all__ = [
    "FileSpanExporter",
    "attributes",
    "carrier",
    "content_capture",
    "parent",
    "setup_tracing",
    "trace_id",
    "tracer",
]

_lock = threading.Lock()
_done = False


class FileSpanExporter(SpanExporter):
    """Spans as JSON lines appended to one file (safe across processes: one write each)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(s.to_json()), separators=(",", ":")) + "\n" for s in spans)
        os.write(self._fd, lines.encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        os.close(self._fd)


def setup_tracing() -> None:
    """Install a tracer provider in this process if the environment asks for traces."""
    global _done
    with _lock:
        if _done:
            return
        _done = True
        path = settings().traces_file
        exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
        otlp = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        if not (path or otlp or exporter in ("otlp", "console")):
            return
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "fleet")})
        provider = TracerProvider(resource=resource)
        if path:
            provider.add_span_processor(BatchSpanProcessor(FileSpanExporter(str(path))))
        if otlp or exporter == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
        if exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)


def _otlp_exporter() -> SpanExporter:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter()


@functools.cache
def tracer() -> trace.Tracer:
    """Fleet's tracer, got once: until a provider is installed, asking the API for one
    reads the environment each time. Got at first use, after ``setup_tracing`` (a proxy
    got earlier would follow a provider installed later, but getting it would install
    one named by ``OTEL_PYTHON_TRACER_PROVIDER`` ahead of ``setup_tracing``'s)."""
    return trace.get_tracer("fleet")


def content_capture() -> bool:
    return settings().trace_content


def parent(carrier: Mapping[str, str]) -> OtelContext:
    """The trace context a ``traceparent`` carrier (from a header or a handle call) holds."""
    return propagate.extract(dict(carrier))


def carrier(span: trace.Span) -> dict[str, str]:
    """``{"traceparent": ...}`` of ``span``: what crosses a deployment handle."""
    out: dict[str, str] = {}
    propagate.inject(out, context=trace.set_span_in_context(span))
    return out


def trace_id(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def attributes(**values: Any) -> dict[str, Any]:
    """Span attributes without the ``None`` ones (OpenTelemetry rejects them)."""
    return {k.replace("__", "."): v for k, v in values.items() if v is not None}
