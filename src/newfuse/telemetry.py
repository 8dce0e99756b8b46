"""OpenTelemetry for newfuse: its tracer and meter, and W3C trace context carried in events.

The library only uses the OpenTelemetry API; the application decides where spans and metrics go
by installing SDK providers. Without them every call here is a cheap no-op. `Telemetry` builds
the providers a long-running `fuse` process installs: OTLP/HTTP export to a collector, and a
Prometheus registry that a health server renders on /metrics.

A leaf: it imports nothing of newfuse, and every layer may import it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Self

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:  # the SDK is imported by the processes that build a Telemetry, not by every one
    from opentelemetry.sdk.metrics.export import MetricReader
    from prometheus_client import CollectorRegistry

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
