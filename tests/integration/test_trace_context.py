"""Trace context travels with events: an append inside a span stamps its W3C traceparent, on the
wire too, and a consumer continues the same trace from it (OpenTelemetry SDK, in-memory export)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from newfuse.eventstore import EventStore, open_event_store
from newfuse.schemas import NewEvent, TraceContext
from newfuse.telemetry import context_from, current_trace_context


@pytest.fixture
async def store(nats_url: str, prefix: str) -> AsyncIterator[EventStore]:
    async with await open_event_store(nats_url, prefix=prefix) as store:
        yield store


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_an_append_inside_a_span_carries_its_traceparent_to_the_consumer(
    store: EventStore,
    nats_url: str,
    prefix: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("produce") as producing:
        await store.append("agent.a1", NewEvent(type="note", data={"n": 1}))
    [event] = [e async for e in store.read("agent.a1")]
    assert event.trace is not None
    trace_id = f"{producing.get_span_context().trace_id:032x}"
    assert event.trace.traceparent.split("-")[1] == trace_id

    with tracer.start_as_current_span("consume", context=context_from(event.trace.traceparent)):
        pass
    consume = next(span for span in exporter.get_finished_spans() if span.name == "consume")
    assert consume.context.trace_id == producing.get_span_context().trace_id
    assert consume.parent is not None
    assert consume.parent.span_id == producing.get_span_context().span_id

    nc = await nats.connect(nats_url)
    message = await nc.jetstream().get_last_msg(f"{prefix.upper()}_EVENTS", f"{prefix}.ev.agent.a1")
    await nc.close()
    assert message.headers is not None
    assert message.headers["traceparent"] == event.trace.traceparent


async def test_without_a_span_no_trace_is_stamped_and_an_explicit_one_wins(
    store: EventStore, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    assert current_trace_context() is None
    explicit = TraceContext(traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    await store.append("agent.a1", NewEvent(type="note", data={}))
    with spans[0].get_tracer("test").start_as_current_span("other"):
        await store.append("agent.a1", NewEvent(type="note", data={}, trace=explicit))
    first, second = [e async for e in store.read("agent.a1")]
    assert first.trace is None
    assert second.trace == explicit
