"""OpenTelemetry for newfuse: its tracer and meter, and W3C trace context carried in events.

newfuse only uses the OpenTelemetry API; the application decides where spans and metrics go by
installing SDK providers (an OTLP exporter, a Prometheus reader, ...). Without them every call
here is a cheap no-op.

A leaf: it imports nothing of newfuse, and every layer may import it.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

INSTRUMENTATION = "newfuse"
"""Instrumentation scope name of every span and metric newfuse emits."""

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer() -> trace.Tracer:
    """newfuse's tracer from the globally installed tracer provider."""
    return trace.get_tracer(INSTRUMENTATION)


def meter() -> metrics.Meter:
    """newfuse's meter from the globally installed meter provider."""
    return metrics.get_meter(INSTRUMENTATION)


def current_trace_context() -> tuple[str, str | None] | None:
    """(traceparent, tracestate) of the active span, or None without a valid span context.

    The event store stamps this on events appended without an explicit trace, so a consumer can
    continue the producer's trace (W3C Trace Context, https://www.w3.org/TR/trace-context/).
    """
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    traceparent = carrier.get("traceparent")
    if traceparent is None:
        return None
    return traceparent, carrier.get("tracestate")


def context_from(traceparent: str | None, tracestate: str | None = None) -> otel_context.Context:
    """An OpenTelemetry context whose parent is the given W3C trace context (if valid).

    Use it to start a consumer's span as a child of the span that produced an event:
    `tracer().start_as_current_span("handle", context=context_from(event.trace.traceparent))`.
    """
    carrier: dict[str, str] = {}
    if traceparent:
        carrier["traceparent"] = traceparent
    if tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier)


def context_from_headers(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The parent context carried in NATS message headers (`traceparent`/`tracestate`)."""
    if not headers:
        return otel_context.Context()
    return context_from(headers.get("traceparent"), headers.get("tracestate"))
