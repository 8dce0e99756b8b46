"""JetStream limits and the shared connection: an event over the server's max_payload (headers
included) is refused before it is sent, not retryable; nothing one caller appends breaks the
connection the others share; a closed connection is not an outage to wait out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from newfuse.errors import EventTooLargeError, JetStreamRefusedError, StoreConnectionClosedError
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import headers as h
from newfuse.schemas import NewEvent


def note(n: int) -> NewEvent:
    return NewEvent(type="note", data={"n": n})


@pytest.fixture
async def store(nats_url: str, prefix: str) -> AsyncIterator[JetStreamEventStore]:
    async with await JetStreamEventStore.connect(nats_url, prefix=prefix) as opened:
        yield opened


def _payload_of(size: int) -> dict[str, str]:
    return {"x": "y" * size}


async def test_an_event_over_max_payload_is_refused_before_sending_anything(
    store: JetStreamEventStore,
) -> None:
    limit = store.nc.max_payload
    assert store.max_event_bytes == limit
    await store.append("agent.a1", note(1))
    sent = store.nc.stats["out_msgs"]
    with pytest.raises(
        EventTooLargeError,
        match=rf"'agent\.big': event .* is 2000\d\d\d bytes, more than the server's max_payload "
        rf"of {limit} bytes; nothing was sent",
    ) as caught:
        await asyncio.wait_for(
            store.append("agent.big", NewEvent(type="n", data="z" * 2_000_000)), 1
        )
    assert not caught.value.retryable
    assert (caught.value.stream, caught.value.limit) == ("agent.big", limit)
    assert store.nc.stats["out_msgs"] == sent, "not even a lookup went out"
    assert (await store.append("agent.a1", note(2))).version == 2


@pytest.mark.parametrize("headroom", [-1_000_000, 40, 200])
async def test_an_event_over_max_payload_among_100_good_appends_harms_no_one(
    store: JetStreamEventStore, headroom: int
) -> None:
    # The server counts headers into max_payload and closes the connection of a client that
    # sends more; nats-py checks only the body. Data of 2 MB, and data just under the limit
    # that the envelope (40) or the headers (200) push over it.
    limit = store.nc.max_payload
    data = _payload_of(limit - headroom - 8)
    head = await store.head_position()

    async def bad() -> None:
        with pytest.raises(EventTooLargeError, match="max_payload") as caught:
            await store.append("agent.near", NewEvent(type="n", data=data))
        assert caught.value.size > limit and not caught.value.retryable

    good = [store.append(f"agent.g{n % 10}", note(n)) for n in range(100)]
    await asyncio.wait_for(asyncio.gather(*good[:50], bad(), *good[50:]), 30)
    assert store.nc.is_connected
    assert await store.head_position() == head + 100
    assert await store.stream_version("agent.near") == 0


async def test_a_batch_with_one_event_too_large_stores_none_of_it(
    store: JetStreamEventStore,
) -> None:
    big = NewEvent(type="n", data=_payload_of(store.nc.max_payload - 100))
    with pytest.raises(EventTooLargeError, match=rf"event '{big.id}'"):
        await store.append("agent.b", [note(1), big, note(3)])
    assert await store.stream_version("agent.b") == 0
    assert (await store.append("agent.b", [note(1), note(2)])).version == 2


async def test_a_non_ascii_stream_name_travels_in_the_subject_and_its_headers_stay_ascii(
    store: JetStreamEventStore, nats_url: str
) -> None:
    # Header values are ASCII (type names and ids are): nats.py's own JetStream get_msg hands
    # a non-ASCII value back as an email Header object, older nats.py dropped every header.
    result = await store.append("agent.ü-1", NewEvent(type="noted", data={"ok": "ü"}))
    others = await asyncio.gather(*(store.append("agent.o", note(n)) for n in range(20)))
    assert others[-1].version == 20
    [read] = [e async for e in store.read("agent.ü-1")]
    assert (read.stream, read.type, read.data) == ("agent.ü-1", "noted", {"ok": "ü"})
    raw = await nats.connect(nats_url)
    try:
        stored = await raw.jetstream().get_msg(store.stream_name, result.position)
    finally:
        await raw.close()
    assert stored.subject == f"{store.subjects.prefix}.ev.agent.ü-1"
    assert stored.headers is not None and stored.headers[h.TYPE] == "noted"
    assert all(isinstance(value, str) and value.isascii() for value in stored.headers.values())


async def test_a_closed_connection_is_not_retryable(nats_url: str, prefix: str) -> None:
    nc = await nats.connect(nats_url)
    store = JetStreamEventStore(nc, prefix=prefix)
    await store.ensure_stream()
    await store.append("agent.a1", note(1))
    await nc.close()
    try:
        with pytest.raises(StoreConnectionClosedError, match=r"connection .* is closed") as caught:
            await asyncio.wait_for(store.append("agent.a1", note(2)), 2)
        assert not caught.value.retryable
        with pytest.raises(StoreConnectionClosedError):
            await store.head_position()
    finally:
        await store.close()


async def test_a_deleted_stream_fails_reads_and_subscriptions_at_once_not_retryable(
    store: JetStreamEventStore, nats_url: str
) -> None:
    await store.append("agent.a1", note(1))
    raw = await nats.connect(nats_url)
    try:
        await raw.jetstream().delete_stream(store.stream_name)
    finally:
        await raw.close()
    with pytest.raises(JetStreamRefusedError, match=r"head position: .*stream not found") as caught:
        await asyncio.wait_for(anext(store.read_all()), 2)
    assert not caught.value.retryable and caught.value.err_code == 10059
    async with store.subscribe() as subscription:  # a live feed would otherwise wait forever
        with pytest.raises(JetStreamRefusedError, match=r"create consumer: .*stream not found"):
            await asyncio.wait_for(anext(subscription), 2)
