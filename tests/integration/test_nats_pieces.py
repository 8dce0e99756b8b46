"""The NATS pieces the store is built from, on a plain stream of their own: the PubAck inbox, the
direct-get pager and the ordered push consumer work without an event store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.js.api import StorageType, StreamConfig

from newfuse.errors import ClosedDuringAppendError, PublishTimeoutError, StoreClosedError
from newfuse.nats import DirectGet, FeedMessage, OrderedPushConsumer, PubAckInbox
from newfuse.nats.direct import sequence_of


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def stream(nc: nats.NATS, prefix: str) -> AsyncIterator[str]:
    """A stream `<PREFIX>_PIECES` on `<prefix>.p.>` that takes direct gets; deleted after."""
    name = f"{prefix.upper()}_PIECES"
    await nc.jetstream().add_stream(
        StreamConfig(
            name=name,
            subjects=[f"{prefix}.p.>"],
            storage=StorageType.MEMORY,
            allow_direct=True,
        )
    )
    yield name
    await nc.jetstream().delete_stream(name)


async def test_the_inbox_returns_each_pubacks_body(nc: nats.NATS, stream: str, prefix: str) -> None:
    inbox = PubAckInbox(nc, "pieces")
    await inbox.start()
    try:
        answers = await asyncio.gather(
            *(inbox.request(f"{prefix}.p.{n % 3}", b"x", {}, 5.0) for n in range(20))
        )
    finally:
        await inbox.close()
    sequences = sorted(msgspec.json.decode(answer)["seq"] for answer in answers)
    assert sequences == list(range(1, 21))


async def test_a_short_deadline_fires_on_time_behind_a_long_one(nc: nats.NATS, prefix: str) -> None:
    silent = await nc.subscribe(f"{prefix}.silent")  # takes requests and never answers
    inbox = PubAckInbox(nc, "pieces")
    await inbox.start()
    try:
        long = asyncio.create_task(inbox.request(f"{prefix}.silent", b"", {}, 30.0))
        began = time.monotonic()
        with pytest.raises(PublishTimeoutError, match=r"silent'.*no acknowledgement within 0.2s"):
            await inbox.request(f"{prefix}.silent", b"", {}, 0.2)
        assert time.monotonic() - began < 2.0
        assert not long.done()
    finally:
        await inbox.close()
        await silent.unsubscribe()
    with pytest.raises(ClosedDuringAppendError, match=r"pieces was closed while an append to"):
        await long
    with pytest.raises(StoreClosedError, match="pieces is closed"):
        await inbox.request(f"{prefix}.silent", b"", {}, 1.0)


async def test_the_inbox_times_out_again_after_an_idle_spell(nc: nats.NATS, prefix: str) -> None:
    silent = await nc.subscribe(f"{prefix}.silent")
    inbox = PubAckInbox(nc, "pieces")
    await inbox.start()
    try:
        with pytest.raises(PublishTimeoutError):
            await inbox.request(f"{prefix}.silent", b"", {}, 0.1)
        await asyncio.sleep(0.3)  # nothing in flight: the sweeper sleeps until the next request
        began = time.monotonic()
        with pytest.raises(PublishTimeoutError):
            await inbox.request(f"{prefix}.silent", b"", {}, 0.1)
        assert time.monotonic() - began < 1.0
    finally:
        await inbox.close()
        await silent.unsubscribe()


async def test_direct_get_finds_one_message_and_pages_through_a_subject(
    nc: nats.NATS, stream: str, prefix: str
) -> None:
    js = nc.jetstream()
    for n in range(1, 8):
        await js.publish(f"{prefix}.p.{'a' if n % 2 else 'b'}", str(n).encode())
    direct = DirectGet(nc, stream, timeout=5.0)
    third = await direct.get("read", seq=3)
    assert third is not None and third.data == b"3" and sequence_of(third) == 3
    assert await direct.get("read", seq=99) is None
    next_b = await direct.get("read", seq=3, next_by_subj=f"{prefix}.p.b")
    assert next_b is not None and next_b.data == b"4"
    last_a = await direct.last_for(f"{prefix}.p.a", "read")
    assert last_a is not None and last_a.data == b"7"
    assert await direct.last_for(f"{prefix}.p.none", "read") is None
    # Batches of 2 from sequence 2: the pager asks again while messages are pending.
    paged = [msg.data async for msg in direct.messages(f"{prefix}.p.a", "read", 2, batch=2)]
    assert paged == [b"3", b"5", b"7"]


async def test_the_ordered_consumer_delivers_from_its_start_in_order_then_cleans_up(
    nc: nats.NATS, stream: str, prefix: str
) -> None:
    js = nc.jetstream()
    for n in range(1, 6):
        await js.publish(f"{prefix}.p.{n}", str(n).encode())
    consumer = OrderedPushConsumer(
        nc,
        stream,
        [f"{prefix}.p.>"],
        3,
        heartbeat=0.5,
        timeout=5.0,
        patience=5.0,
        owner="pieces",
    )
    got: list[FeedMessage] = []
    try:
        assert await consumer.start() == 3
        async for message in consumer:
            got.append(message)
            if message.pending == 0:
                break
        assert (await js.stream_info(stream)).state.consumer_count == 1
    finally:
        await consumer.close()
    assert [(m.sequence, m.subject, m.data) for m in got] == [
        (n, f"{prefix}.p.{n}", str(n).encode()) for n in (3, 4, 5)
    ]
    assert [m.pending for m in got] == [2, 1, 0] and all(m.time_ns > 0 for m in got)
    assert (await js.stream_info(stream)).state.consumer_count == 0
    with pytest.raises(StoreClosedError, match="pieces is closed"):
        async for _ in consumer:
            pass
