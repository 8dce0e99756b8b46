"""OpenTelemetry for newfuse: its tracer and meter, and W3C trace context carried in events.

The library only uses the OpenTelemetry API; the application decides where spans and metrics go
by installing SDK providers. Without them every call here is a cheap no-op. `Telemetry` builds
the providers a long-running `fuse` process installs: OTLP/HTTP export to a collector, and a
Prometheus registry that a health server renders on /metrics.

A leaf: it imports nothing of newfuse, and every layer may import it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Self

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:  # the SDK is imported by the processes that build a Telemetry, not by every one
    from opentelemetry.sdk.metrics.export import MetricReader
    from prometheus_client import CollectorRegistry

INSTRUMENTATION = "newfuse"
"""Instrumentation scope name of every span and metric newfuse emits."""

_PROPAGATOR = TraceContextTextMapPropagator()
_GLOBAL_READABLE: Final = (
    hasattr(trace, "_TRACER_PROVIDER") and "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ
)
"""Whether `records_nothing` may read the API's global provider (None until one is set)."""

# OpenTelemetry messaging semantic conventions (checked against opentelemetry-semantic-conventions
# 0.66b2, whose messaging attributes are still incubating, so they are spelled out here rather
# than imported). Semconv has no system-neutral delivery count, hence newfuse's own.
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION_NAME: Final = "messaging.destination.name"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_MESSAGE_ID: Final = "messaging.message.id"
MESSAGING_MESSAGE_CONVERSATION_ID: Final = "messaging.message.conversation_id"
MESSAGING_CONSUMER_GROUP_NAME: Final = "messaging.consumer.group.name"
NEWFUSE_AGENT_ID: Final = "newfuse.agent.id"
NEWFUSE_MESSAGE_TYPE: Final = "newfuse.message.type"
NEWFUSE_DELIVERY_COUNT: Final = "newfuse.message.delivery_count"
NEWFUSE_POSITION: Final = "newfuse.message.position"
SYSTEM_NATS: Final = "nats"


def tracer() -> trace.Tracer:
    """newfuse's tracer from the globally installed tracer provider."""
    return trace.get_tracer(INSTRUMENTATION)


def meter() -> metrics.Meter:
    """newfuse's meter from the globally installed meter provider."""
    return metrics.get_meter(INSTRUMENTATION)


def records_nothing(tracer: trace.Tracer) -> bool:
    """True when `tracer` records no span: the API's no-op tracer, or a proxy (newfuse's default
    tracer) while no SDK provider is installed. Hot paths then skip making spans, and only pass
    on a trace context that arrived."""
    if isinstance(tracer, trace.NoOpTracer):
        return True
    if not isinstance(tracer, trace.ProxyTracer):
        return False
    if _GLOBAL_READABLE:
        # The public getter looks the provider up in os.environ on every call (~1 us here);
        # the global it reads is set once per process, so reading it directly is as exact.
        return trace._TRACER_PROVIDER is None
    return isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def in_span() -> bool:
    """Whether a span with a valid context (recording or passed on) is current."""
    return trace.get_current_span().get_span_context().is_valid


def current_trace_context() -> tuple[str, str | None] | None:
    """(traceparent, tracestate) of the active span, or None without a valid span context.

    The event store stamps this on events appended without an explicit trace, so a consumer can
    continue the producer's trace (W3C Trace Context, https://www.w3.org/TR/trace-context/).
    """
    return trace_context_of(trace.get_current_span())


def trace_context_of(span: trace.Span) -> tuple[str, str | None] | None:
    """(traceparent, tracestate) naming `span` as the parent, or None if its context is invalid
    (the no-op tracer's span when nothing is traced)."""
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return None
    traceparent = (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{span_context.trace_flags:02x}"
    )
    state = span_context.trace_state
    return traceparent, (state.to_header() or None) if state else None


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


def remote_parent(
    headers: Mapping[str, str] | None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> otel_context.Context | None:
    """The parent of a consumer's span: the headers' trace context, else the given one (an
    envelope's), else None (start a new trace: never the context that happens to be current).

    What a foreign client sent is not trusted: a malformed, oversized or non-text value is
    ignored (W3C Trace Context: an unparsable traceparent starts a new trace).
    """
    if headers:
        parent = _valid_parent(headers.get("traceparent"), headers.get("tracestate"))
        if parent is not None:
            return parent
    if traceparent:
        parent = _valid_parent(traceparent, tracestate)
        if parent is not None:
            return parent
    return None


def _valid_parent(traceparent: object, tracestate: object) -> otel_context.Context | None:
    if not isinstance(traceparent, str) or not traceparent:
        return None
    try:
        parent = context_from(traceparent, tracestate if isinstance(tracestate, str) else None)
    except Exception:  # a propagator that chokes on hostile input must not stop a consumer
        return None
    if not trace.get_current_span(parent).get_span_context().is_valid:
        return None
    return parent


class Telemetry:
    """SDK providers for one process: OTLP/HTTP export and a Prometheus registry, as asked.

    Example:
        telemetry = Telemetry(otlp_endpoint="http://127.0.0.1:4318", prometheus=True)
        telemetry.install()        # newfuse's tracer() and meter() now record into it
        ...
        await telemetry.close()    # flushes what is still buffered

    Args:
        otlp_endpoint: base URL of an OTLP/HTTP receiver; spans go to `<url>/v1/traces`,
            metrics to `<url>/v1/metrics` (every `export_interval` seconds, and on close).
            None: nothing is exported.
        prometheus: keep a Prometheus registry of every metric (see `prometheus_text`).
        service_name: the `service.name` resource attribute of everything exported.
        export_interval: seconds between OTLP metric exports.
        export_timeout: seconds one export may take, its retries included (so closing with
            an unreachable collector takes about twice this, not minutes).
    """

    def __init__(
        self,
        *,
        otlp_endpoint: str | None = None,
        prometheus: bool = False,
        service_name: str = "newfuse",
        export_interval: float = 10.0,
        export_timeout: float = 3.0,
    ) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": service_name})
        readers: list[MetricReader] = []
        self.tracer_provider = TracerProvider(resource=resource)
        self.registry: CollectorRegistry | None = None
        if otlp_endpoint is not None:
            # imported only when used: the exporters pull in requests and protobuf
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            base = otlp_endpoint.rstrip("/")
            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=f"{base}/v1/traces", timeout=export_timeout),
                    export_timeout_millis=export_timeout * 1000,
                )
            )
            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=f"{base}/v1/metrics", timeout=export_timeout),
                    export_interval_millis=export_interval * 1000,
                    export_timeout_millis=export_timeout * 1000,
                )
            )
        if prometheus:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry

            # a registry of our own, not prometheus_client's global one: two Telemetry objects
            # in one process (tests) never see each other's metrics
            self.registry = CollectorRegistry()
            readers.append(PrometheusMetricReader(registry=self.registry))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.otlp_endpoint = otlp_endpoint
        self._timeout_millis = export_timeout * 1000
        self._closed = False

    def install(self) -> Self:
        """Make these providers the global ones (once per process: OpenTelemetry's rule)."""
        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(self.meter_provider)
        return self

    def tracer(self) -> trace.Tracer:
        """newfuse's tracer from these providers (without installing them)."""
        return self.tracer_provider.get_tracer(INSTRUMENTATION)

    def meter(self) -> metrics.Meter:
        """newfuse's meter from these providers (without installing them)."""
        return self.meter_provider.get_meter(INSTRUMENTATION)

    def prometheus_text(self) -> bytes:
        """Every metric in the Prometheus text exposition format (empty without `prometheus`)."""
        if self.registry is None:
            return b""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    async def flush(self) -> None:
        """Export what is buffered now (the exporters block on HTTP: run off the loop)."""
        await asyncio.to_thread(self.tracer_provider.force_flush)
        await asyncio.to_thread(self.meter_provider.force_flush)

    async def close(self) -> None:
        """Flush and shut the providers down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self.tracer_provider.shutdown)
        await asyncio.to_thread(self.meter_provider.shutdown, self._timeout_millis)
