"""The JetStream store across `kill -9` of its nats-server: live subscribers lose nothing and see
nothing twice; an append in flight during the restart is stored once or fails retryably; a
finite read gives up after the store's timeout; closing the store never leaves an append
waiting."""

from __future__ import annotations

import asyncio
from collections import Counter

import nats
import pytest

from newfuse.errors import (
    ClosedDuringAppendError,
    FuseError,
    ReadInterruptedError,
    StoreClosedError,
)
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


async def test_a_finite_read_all_gives_up_after_the_store_timeout_and_names_where_to_resume(
    nats_server: NatsServer,
) -> None:
    store = await JetStreamEventStore.connect(
        nats_server.url, prefix="r", timeout=1.0, heartbeat=0.2
    )
    total = 3000
    blob = "x" * 4000  # 12 MB in all: flow control keeps most of it on the server
    try:
        for start in range(0, total, 100):
            await store.append(
                f"agent.r{start % 7}",
                [
                    NewEvent(type="note", data={"n": n, "blob": blob})
                    for n in range(start, start + 100)
                ],
            )
        got: list[int] = []

        async def replay() -> None:
            async for event in store.read_all():
                got.append(event.position)
                if len(got) == 1:
                    await nats_server.kill()

        with pytest.raises(
            ReadInterruptedError, match=r"gave up after 1s at position \d+ .*resume from position"
        ) as caught:
            await asyncio.wait_for(replay(), 60)  # a deadline for the test, not the store
        assert caught.value.retryable
        assert caught.value.position == got[-1]
        assert got == list(range(1, len(got) + 1)) and len(got) < total

        await nats_server.restart()
        rest: list[int] = []

        async def resume() -> bool:
            try:
                rest[:] = [e.position async for e in store.read_all(caught.value.position + 1)]
            except FuseError as error:
                if not error.retryable:
                    raise
                return False  # still reconnecting
            return True

        await wait_for(resume, timeout=30, interval=0.1)
        assert got + rest == list(range(1, total + 1))
    finally:
        await store.close()


async def test_an_append_on_a_borrowed_client_never_waits_on_a_store_closed_under_it(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    store = JetStreamEventStore(nc, prefix="c", timeout=10.0)
    try:
        await store.append("agent.warm", note(0))  # cached: the next append publishes at once
        await nats_server.kill()
        await wait_for(lambda: _true(nc.is_reconnecting))  # what is sent now waits in the client
        sent = nc.stats["out_msgs"]
        waiting_for_ack = asyncio.create_task(store.append("agent.warm", note(1)))
        await wait_for(lambda: _true(nc.stats["out_msgs"] > sent), interval=0)
        sent = nc.stats["out_msgs"]
        # A stream the store has not seen: the append first asks the server for its state.
        waiting_for_state = asyncio.create_task(store.append("agent.cold", note(2)))
        await wait_for(lambda: _true(nc.stats["out_msgs"] > sent), interval=0)

        await store.close()
        # In flight: failed by close itself, with the server still down.
        with pytest.raises(
            ClosedDuringAppendError, match=r"append to 'c\.ev\.agent\.warm'.*may or may not"
        ):
            await asyncio.wait_for(waiting_for_ack, 10)
        # Not yet publishing when the store closed: once the server answers its state request,
        # it is refused at once instead of waiting for an acknowledgement nothing would deliver.
        await nats_server.restart()
        with pytest.raises(StoreClosedError, match="JetStreamEventStore is closed"):
            await asyncio.wait_for(waiting_for_state, 30)
        assert nc.is_connected or nc.is_reconnecting  # the client is the caller's: still open
        async with JetStreamEventStore(nc, prefix="c") as other:
            assert await other.stream_version("agent.cold") == 0  # nothing was written
    finally:
        await store.close()
        await nc.close()


async def test_closing_the_store_ends_a_subscription_waiting_for_a_dead_server(
    nats_server: NatsServer,
) -> None:
    # A long timeout: the subscriber must not sit out a consumer create nobody will answer.
    store = await JetStreamEventStore.connect(
        nats_server.url, prefix="w", timeout=60.0, heartbeat=0.2
    )
    try:
        await store.append("agent.w1", note(1))
        seen: list[int] = []

        async def follow() -> None:
            async with store.subscribe() as subscription:
                async for event in subscription:
                    seen.append(event.data["n"])

        follower = asyncio.create_task(follow())
        await wait_for(lambda: _true(seen == [1]))
        await nats_server.kill()
        sent = store.nc.stats["out_msgs"]
        # Three silent heartbeats later it asks the (dead) server for a new consumer.
        await wait_for(lambda: _true(store.nc.stats["out_msgs"] > sent))
        await store.close()
        with pytest.raises(StoreClosedError, match="JetStreamEventStore is closed"):
            await asyncio.wait_for(follower, 10)  # well before the 60 s request timeout
    finally:
        await store.close()


async def _true(condition: bool) -> bool:
    return condition
