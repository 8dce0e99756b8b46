"""The store's own counters (events appended, elections ridden out) reach the process's global
OpenTelemetry meter provider, which is what `/metrics` and OTLP export read."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from newfuse.nats import NatsServer

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    from newfuse.errors import StoreUnavailableError
    from newfuse.eventstore import open_event_store
    from newfuse.nats.election import ride_out
    from newfuse.schemas import NewEvent

    async def main() -> None:
        for url in ("sqlite://:memory:", sys.argv[1]):
            async with await open_event_store(url, prefix=sys.argv[2]) as store:
                await store.append("agent.m1", NewEvent(type="note", data={}))
                await store.append(
                    "agent.m1", [NewEvent(type="note", data={}) for _ in range(2)]
                )
        failures = []

        async def step(wait: float) -> str:
            if not failures:
                failures.append(1)
                raise StoreUnavailableError(operation="append", reason="no stream leader")
            return "ok"

        loop = asyncio.get_running_loop()
        await ride_out(step, operation="append to 'agent.m1'", deadline=loop.time() + 5, timeout=5)
        await ride_out(step, operation="head position", deadline=loop.time() + 5, timeout=5)
        points = {}
        for resource in reader.get_metrics_data().resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        key = metric.name + " " + json.dumps(dict(point.attributes))
                        points[key] = point.value
        print(json.dumps(points))

    asyncio.run(main())
    """
)


def test_appended_events_and_ridden_out_elections_are_counted(
    nats_server: NatsServer, prefix: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, nats_server.url, prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    points = json.loads(done.stdout)
    assert points['newfuse.store.appended {"backend": "sqlite"}'] == 3
    assert points['newfuse.store.appended {"backend": "jetstream"}'] == 3
    # only the operation that failed first counts; its kind names no stream
    assert points['newfuse.store.elections_ridden_out {"operation": "append"}'] == 1
    assert 'newfuse.store.elections_ridden_out {"operation": "head position"}' not in points
