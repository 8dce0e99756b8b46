"""The JetStream store across `kill -9` of its nats-server: live subscribers lose nothing and see
nothing twice; an append in flight during the restart is stored once or fails retryably."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from newfuse.errors import FuseError
from newfuse.eventstore import ANY, AppendResult
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats.embedded import NatsServer
from newfuse.schemas import NewEvent, RecordedEvent
from support import wait_for

pytestmark = pytest.mark.faults


def note(n: int) -> NewEvent:
    return NewEvent(type="note", data={"n": n})


async def append_until_stored(
    store: JetStreamEventStore, stream: str, event: NewEvent
) -> AppendResult:
    """Retry the same event (same id) while the store says retrying may help."""
    results: list[AppendResult] = []

    async def attempt() -> bool:
        try:
            results.append(await store.append(stream, event, ANY))
        except FuseError as error:
            if not error.retryable:
                raise
            return False
        return True

    await wait_for(attempt, timeout=30, interval=0.05)
    return results[0]


async def test_a_live_subscriber_gets_every_event_once_in_order_across_kill_9_and_restart(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    writer = await JetStreamEventStore.connect(url, prefix="f", timeout=2.0)
    reader = await JetStreamEventStore.connect(url, prefix="f", timeout=2.0, heartbeat=0.5)
    seen: list[RecordedEvent] = []
    total = 60
    try:
        await writer.append("agent.k1", [note(n) for n in range(20)])
        async with reader.subscribe() as subscription:

            async def consume() -> None:
                async for event in subscription:
                    seen.append(event)
                    if len(seen) == total:
                        return

            consumer = asyncio.create_task(consume())
            await wait_for(lambda: _true(len(seen) == 20))

            await nats_server.kill()  # SIGKILL: no goodbye to clients
            in_flight_event = note(20)
            in_flight = asyncio.create_task(writer.append("agent.k1", in_flight_event, ANY))
            await nats_server.restart()  # same port, same store directory
            try:
                await in_flight
            except FuseError as error:
                assert error.retryable, f"an in-flight append failed for good: {error}"
            await append_until_stored(writer, "agent.k1", in_flight_event)  # same id: once
            for n in range(21, 40):
                await append_until_stored(writer, "agent.k1", note(n))

            await nats_server.kill()
            await nats_server.restart()
            for n in range(40, total):
                await append_until_stored(writer, "agent.k2", note(n))
            await asyncio.wait_for(consumer, 30)

        assert [e.data["n"] for e in seen] == list(range(total)), "gaps, duplicates or disorder"
        positions = [e.position for e in seen]
        assert positions == sorted(set(positions))
        stored = [e async for e in writer.read("agent.k1")]
        assert Counter(e.id for e in stored)[in_flight_event.id] == 1
        assert [e.version for e in stored] == list(range(1, 41))
    finally:
        await writer.close()
        await reader.close()


async def test_a_subscriber_started_while_the_server_is_down_catches_up_after_restart(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    writer = await JetStreamEventStore.connect(url, prefix="g", timeout=2.0)
    reader = await JetStreamEventStore.connect(url, prefix="g", timeout=2.0, heartbeat=0.5)
    try:
        await writer.append("agent.a", [note(n) for n in range(5)])
        await nats_server.kill()
        got: list[int] = []

        async def consume() -> None:
            async with reader.subscribe(from_position=3) as subscription:
                async for event in subscription:
                    got.append(event.data["n"])
                    if event.data["n"] == 7:
                        return

        consumer = asyncio.create_task(consume())
        await nats_server.restart()
        for n in range(5, 8):
            await append_until_stored(writer, "agent.a", note(n))
        await asyncio.wait_for(consumer, 30)
        assert got == [2, 3, 4, 5, 6, 7]
    finally:
        await writer.close()
        await reader.close()


async def _true(condition: bool) -> bool:
    return condition
