"""Projection lag is a metric: a runner reports lag, checkpoint and rate as OpenTelemetry gauges
(read here through the SDK's in-memory reader, a real metrics pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from newfuse.eventstore import open_event_store
from newfuse.projections import Projection, ProjectionRunner, RedisBatch, RedisReadModel
from newfuse.schemas import NewEvent, RecordedEvent
from support import wait_for


def gauges(reader: InMemoryMetricReader, projection: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:  # type: ignore[union-attr]
                    if point.attributes.get("projection") == projection:
                        values[metric.name] = point.value
    return values


async def test_a_runner_reports_lag_checkpoint_and_rate_as_gauges(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    projection: Projection[RedisBatch] = Projection("counted")

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        batch.incrby(batch.key("total"), event.data["n"])

    async with (
        await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store,
        await RedisReadModel.connect(redis_url, root=f"{prefix}:proj") as model,
    ):
        for n in range(1, 51):
            await store.append("agent.a1", NewEvent(type="note", data={"n": n}))
        async with ProjectionRunner(
            projection, store, model, batch_size=10, stats_interval=0.0, meter=meter
        ) as runner:
            await runner.wait_until(50, timeout=10)

            async def reported_caught_up() -> bool:
                seen = gauges(reader, "counted")
                return seen.get("newfuse.projection.checkpoint") == 50

            await wait_for(reported_caught_up)
            seen = gauges(reader, "counted")
            assert seen["newfuse.projection.lag"] == 0
            assert seen["newfuse.projection.rate"] >= 0
            await store.append("agent.a1", NewEvent(type="note", data={"n": 51}))
            await runner.wait_until(51, timeout=10)

            async def reported_again() -> bool:
                return gauges(reader, "counted").get("newfuse.projection.checkpoint") == 51

            await wait_for(reported_again)
