"""/healthz, /readyz and /metrics answer real HTTP requests; readiness follows the NATS server of
the test (stopped: not ready; back: ready) and the projection's lag, counting only events it
handles."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from newfuse.config import Settings
from newfuse.errors import ConfigError, HealthServerError
from newfuse.eventstore import EventStore, open_event_store
from newfuse.health import HealthServer
from newfuse.nats.embedded import NatsServer
from newfuse.projections import Projection, ProjectionRunner, RedisBatch, RedisReadModel
from newfuse.projections.health import operations, projection_checks
from newfuse.schemas import NewEvent, RecordedEvent
from newfuse.telemetry import Telemetry
from support import wait_for


async def get(url: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one real HTTP request (urllib, off the event loop)."""

    def fetch() -> tuple[int, str, str]:
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["Content-Type"], error.read().decode()

    return await asyncio.to_thread(fetch)


def sample(metric: str, text: str, projection: str | None = "counted") -> str | None:
    """The value of `metric` (of one projection) in Prometheus text, or None."""
    label = rf'[^}}]*projection="{projection}"' if projection else "[^}]*"
    found = re.search(rf"^{metric}\{{{label}[^}}]*\}} (\S+)$", text, re.MULTILINE)
    return found.group(1) if found else None


def counting_projection(name: str, gate: asyncio.Event | None = None) -> Projection[RedisBatch]:
    projection: Projection[RedisBatch] = Projection(name)

    @projection.on("note")
    async def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        if gate is not None:
            await gate.wait()
        batch.incrby(batch.key("total"), event.data["n"])

    return projection


@pytest.fixture
async def store(nats_server: NatsServer, prefix: str) -> AsyncIterator[EventStore]:
    async with await open_event_store(
        nats_server.url, prefix=prefix, timeout=1.0, heartbeat=0.2
    ) as opened:
        yield opened


@pytest.fixture
async def model(redis_url: str, prefix: str) -> AsyncIterator[RedisReadModel]:
    async with await RedisReadModel.connect(redis_url, root=f"{prefix}:proj") as opened:
        yield opened


async def test_the_three_endpoints_answer_and_metrics_count_what_the_runner_applied(
    store: EventStore, model: RedisReadModel
) -> None:
    telemetry = Telemetry(prometheus=True)
    projection = counting_projection("counted")
    for n in range(1, 21):
        await store.append("agent.a1", NewEvent(type="note", data={"n": n}))
    async with (
        ProjectionRunner(
            projection, store, model, batch_size=5, stats_interval=0.0, meter=telemetry.meter()
        ) as runner,
        await HealthServer(
            "127.0.0.1:0",
            checks=projection_checks(store, [runner]),
            metrics=telemetry.prometheus_text,
        ).start() as health,
    ):
        assert health.port != 0
        await runner.wait_until(20, timeout=10)
        assert await get(f"{health.url}/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        status, _, body = await get(f"{health.url}/readyz?verbose")
        assert (status, body) == (200, "store ok\ncounted ok\n")

        async def scraped_all() -> bool:
            _, _, text = await get(f"{health.url}/metrics")
            return sample("newfuse_projection_checkpoint", text) == "20.0"

        await wait_for(scraped_all)
        status, content_type, text = await get(f"{health.url}/metrics")
        assert status == 200
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert sample("newfuse_projection_applied_total", text) == "20.0"
        assert sample("newfuse_projection_lag", text) == "0.0"
        assert sample("newfuse_store_head_position", text, projection=None) == "20.0"
        assert (await get(f"{health.url}/nope"))[0] == 404
        assert (await get(f"{health.url}/healthz", method="POST"))[0] == 405
        assert (await get(f"{health.url}/healthz", method="HEAD"))[::2] == (200, "")


async def test_readiness_fails_while_the_nats_server_is_down_and_returns_with_it(
    nats_server: NatsServer, store: EventStore, model: RedisReadModel
) -> None:
    await store.append("agent.a1", NewEvent(type="note", data={"n": 1}))
    async with (
        ProjectionRunner(counting_projection("followed"), store, model) as runner,
        await HealthServer(
            "127.0.0.1:0", checks=projection_checks(store, [runner]), check_timeout=1.0
        ).start() as health,
    ):
        await runner.wait_until(1, timeout=10)
        assert (await get(f"{health.url}/readyz"))[0] == 200
        await nats_server.kill()
        seen: dict[str, Any] = {}

        async def not_ready() -> bool:
            seen["status"], _, seen["body"] = await get(f"{health.url}/readyz")
            return bool(seen["status"] == 503)

        await wait_for(not_ready, timeout=15)
        assert "store not ready:" in seen["body"]
        assert (await get(f"{health.url}/healthz"))[0] == 200  # alive all the same
        await nats_server.restart()

        async def ready() -> bool:
            return (await get(f"{health.url}/readyz"))[0] == 200

        await wait_for(ready, timeout=30)
        result = await store.append("agent.a1", NewEvent(type="note", data={"n": 2}))
        await runner.wait_until(result.position, timeout=10)


async def test_readiness_counts_lag_of_events_the_projection_handles_only(
    store: EventStore, model: RedisReadModel
) -> None:
    gate = asyncio.Event()
    runner = ProjectionRunner(counting_projection("gated", gate), store, model, linger=0)
    async with (
        runner,
        await HealthServer(
            "127.0.0.1:0",
            checks=projection_checks(store, [runner], max_lag_seconds=60, max_lag_events=2),
        ).start() as health,
    ):
        # events of types it does not handle leave its checkpoint behind the head: not lag
        for n in range(5):
            await store.append("agent.other", NewEvent(type="unrelated", data={"n": n}))

        async def running() -> bool:
            return runner.state == "running"

        await wait_for(running)
        assert await get(f"{health.url}/readyz") == (
            200,
            "text/plain; charset=utf-8",
            "store ok\ngated ok\n",
        )
        # three handled events held back by the handler: 3 positions from the first to the head
        for n in range(3):
            await store.append("agent.a1", NewEvent(type="note", data={"n": n}))
        status, _, body = await get(f"{health.url}/readyz")
        assert status == 503
        assert "gated not ready: behind by 3 events from position 6 (limit 2)" in body
        gate.set()
        await runner.wait_until(8, timeout=10)
        assert (await get(f"{health.url}/readyz"))[0] == 200


async def test_a_runner_that_is_not_running_is_not_ready(
    store: EventStore, model: RedisReadModel
) -> None:
    runner = ProjectionRunner(counting_projection("idle"), store, model)
    async with await HealthServer(
        "127.0.0.1:0", checks=projection_checks(store, [runner])
    ).start() as health:
        assert await get(f"{health.url}/readyz") == (
            503,
            "text/plain; charset=utf-8",
            "store ok\nidle not ready: starting\n",
        )


async def test_a_port_in_use_is_a_health_server_error_naming_the_address() -> None:
    async with await HealthServer("127.0.0.1:0").start() as first:
        taken = f"127.0.0.1:{first.port}"
        with pytest.raises(HealthServerError, match=rf"^health server on {taken}: .*--health"):
            await HealthServer(taken).start()


@pytest.mark.parametrize("address", ["nowhere", "127.0.0.1:", ":80", "127.0.0.1:70000"])
def test_an_address_that_is_not_host_port_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match=r"expected host:port"):
        HealthServer(address)
    with pytest.raises(ConfigError, match=r"^FUSE_HEALTH_ADDR="):
        Settings.from_env({"FUSE_HEALTH_ADDR": address})


async def test_operations_prints_the_url_of_a_free_port_and_serves_until_the_block_ends(
    store: EventStore, model: RedisReadModel, tmp_path: Any
) -> None:
    runner = ProjectionRunner(counting_projection("served"), store, model)
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        async with (
            runner,
            operations(
                Settings(), store, [runner], health="127.0.0.1:0", install=False, out=sink
            ) as health,
        ):
            assert health is not None
            await store.append("agent.a1", NewEvent(type="note", data={"n": 1}))
            await runner.wait_until(1, timeout=10)
            assert (await get(f"{health.url}/readyz"))[0] == 200
            url = health.url
    assert out.read_text() == f"fuse: health on {url} (/healthz, /readyz, /metrics)\n"
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(urllib.request.urlopen, f"{url}/healthz", timeout=2)


async def test_operations_without_an_address_or_collector_does_nothing(
    store: EventStore,
) -> None:
    async with operations(Settings(), store) as health:
        assert health is None
