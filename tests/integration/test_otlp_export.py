"""Spans and metrics reach an OpenTelemetry collector over OTLP/HTTP: a receiver on loopback (a
real HTTP server) decodes the protobuf request bodies with opentelemetry-proto."""

from __future__ import annotations

import time
from pathlib import Path

from newfuse.config import Settings
from newfuse.eventstore import open_event_store
from newfuse.nats.embedded import free_port
from newfuse.projections import Projection, ProjectionRunner, RedisBatch, RedisReadModel
from newfuse.schemas import NewEvent, RecordedEvent
from newfuse.telemetry import Telemetry
from otlp_receiver import Receiver, receiver

__all__ = ["receiver"]  # the fixture


async def test_a_runner_s_spans_and_counters_arrive_at_the_collector(
    receiver: Receiver, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    telemetry = Telemetry(otlp_endpoint=receiver.url + "/", service_name="fuse-test")
    tracer = telemetry.tracer()
    projection: Projection[RedisBatch] = Projection("exported")

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        batch.incrby(batch.key("total"), event.data["n"])

    try:
        async with (
            await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store,
            await RedisReadModel.connect(redis_url, root=f"{prefix}:proj") as model,
        ):
            with tracer.start_as_current_span("produce") as produce:
                for n in range(1, 11):  # the events carry this span's trace context
                    await store.append("agent.a1", NewEvent(type="note", data={"n": n}))
            async with ProjectionRunner(
                projection, store, model, meter=telemetry.meter(), tracer=tracer
            ) as runner:
                await runner.wait_until(10, timeout=10)
            await telemetry.flush()
    finally:
        await telemetry.close()

    assert receiver.content_types == {"application/x-protobuf"}
    spans = receiver.spans()
    names = {span.name for _, span in spans}
    assert {"produce", "newfuse.projection.batch"} <= names
    resource, batch_span = next(
        (resource, span) for resource, span in spans if span.name == "newfuse.projection.batch"
    )
    attributes = {a.key: a.value for a in batch_span.attributes}
    assert attributes["newfuse.projection"].string_value == "exported"
    assert attributes["newfuse.position.first"].int_value == 1
    produced = produce.get_span_context().trace_id.to_bytes(16, "big")
    assert {link.trace_id for link in batch_span.links} == {produced}
    service = {a.key: a.value.string_value for a in resource.attributes}
    assert service["service.name"] == "fuse-test"
    assert max(receiver.sums("newfuse.projection.applied", "exported")) == 10


def test_the_collector_url_comes_from_fuse_otlp_endpoint_or_the_standard_variable() -> None:
    standard = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert Settings.from_env(standard).otlp_endpoint == "http://collector:4318"
    ours = {**standard, "FUSE_OTLP_ENDPOINT": "https://other:4318"}
    assert Settings.from_env(ours).otlp_endpoint == "https://other:4318"
    assert Settings.from_env({}).otlp_endpoint is None


async def test_closing_with_an_unreachable_collector_takes_a_bounded_time() -> None:
    telemetry = Telemetry(otlp_endpoint=f"http://127.0.0.1:{free_port()}", export_timeout=1.0)
    with telemetry.tracer().start_as_current_span("lost"):
        telemetry.meter().create_counter("newfuse.test.lost").add(1)
    started = time.monotonic()
    await telemetry.close()
    assert time.monotonic() - started < 5.0  # without the bound: about 14 s of retries
