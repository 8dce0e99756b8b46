"""JetStream backend behaviour beyond the shared contract: the wire format it writes,
server-checked concurrency, idempotent retries inside and past the duplicate window, atomic
batches on the raw client, and foreign messages on event subjects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import nats
import pytest
from nats.js.api import StorageType, StreamConfig

from newfuse.errors import (
    AtomicBatchUnsupportedError,
    DuplicateEventError,
    StoreClosedError,
    StoreConnectionClosedError,
    WrongExpectedVersionError,
)
from newfuse.eventstore import ANY, NO_STREAM, EventFilter
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import headers as h
from newfuse.nats import publish_atomic_batch
from newfuse.nats.jserrors import BatchDuplicateIdError, WrongLastSequenceError
from newfuse.schemas import NewEvent, TraceContext
from support import wait_for


def note(n: int, **fields: object) -> NewEvent:
    return NewEvent(type="note", data={"n": n}, **fields)  # type: ignore[arg-type]


@pytest.fixture
async def store(nats_url: str, prefix: str) -> AsyncIterator[JetStreamEventStore]:
    async with await JetStreamEventStore.connect(nats_url, prefix=prefix) as opened:
        yield opened


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def test_an_event_is_stored_as_the_documented_wire_message(
    store: JetStreamEventStore, nc: nats.NATS, prefix: str
) -> None:
    trace = TraceContext(traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    first = await store.append("agent.w1", note(1, trace=trace, correlation_id="c1"), NO_STREAM)
    second = await store.append("agent.w1", note(2), 1)
    stream = f"{prefix.upper()}_EVENTS"
    raw1 = await nc.jetstream().get_msg(stream, first.position)
    raw2 = await nc.jetstream().get_msg(stream, second.position)
    assert raw1.subject == f"{prefix}.ev.agent.w1" and raw1.seq == first.position
    assert raw1.headers is not None and raw2.headers is not None
    assert raw1.headers[h.MSG_ID] == first.ids[0]
    assert raw1.headers[h.TYPE] == "note" and raw1.headers[h.SCHEMA_VERSION] == "1"
    assert raw1.headers[h.STREAM_VERSION] == "1" and raw2.headers[h.STREAM_VERSION] == "2"
    # The expectation sent is the subject's last sequence: 0 for a new stream, then the last.
    assert raw1.headers[h.EXPECTED_LAST_SUBJECT_SEQUENCE] == "0"
    assert raw2.headers[h.EXPECTED_LAST_SUBJECT_SEQUENCE] == str(first.position)
    assert raw1.headers[h.TRACEPARENT] == trace.traceparent
    assert raw1.data is not None
    body = msgspec.json.decode(raw1.data)
    assert body["id"] == first.ids[0] and body["stream"] == "agent.w1"
    assert body["version"] == 1 and body["type"] == "note" and body["data"] == {"n": 1}
    assert body["correlation_id"] == "c1" and body["trace"] == {"traceparent": trace.traceparent}


async def test_the_server_catches_a_stale_cache_and_the_conflict_names_the_actual_version(
    nats_url: str, prefix: str
) -> None:
    async with (
        await JetStreamEventStore.connect(nats_url, prefix=prefix) as a,
        await JetStreamEventStore.connect(nats_url, prefix=prefix) as b,
    ):
        await a.append("agent.s1", note(1), NO_STREAM)  # a now believes the stream is at 1
        await b.append("agent.s1", note(2), 1)  # ... but b moved it to 2
        head = await a.head_position()
        # a does not read before writing: the server refuses its stale expectation (10071).
        with pytest.raises(
            WrongExpectedVersionError, match=r"expected version 1, stream is at version 2"
        ):
            await a.append("agent.s1", note(99), 1)
        assert await a.head_position() == head
        # With ANY, a retries with the fresh last sequence and the versions stay contiguous.
        result = await a.append("agent.s1", note(3), ANY)
        assert result.version == 3
        events = [e async for e in b.read("agent.s1")]
        assert [(e.version, e.data["n"]) for e in events] == [(1, 1), (2, 2), (3, 3)]


async def test_a_retry_past_the_duplicate_window_returns_the_first_result(
    nats_url: str, prefix: str
) -> None:
    async with await JetStreamEventStore.connect(
        nats_url, prefix=prefix, duplicate_window=0.2
    ) as store:
        batch = [note(1), note(2)]
        first_batch = await store.append("agent.r1", batch, NO_STREAM)
        single = note(3)
        first_single = await store.append("agent.r1", single, 2)
        stored_at = time.monotonic()
        await wait_for(lambda: _true(time.monotonic() - stored_at > 0.5))  # window is over
        head = await store.head_position()
        assert await store.append("agent.r1", batch, NO_STREAM) == first_batch
        assert await store.append("agent.r1", single, 2) == first_single
        async with await JetStreamEventStore.connect(
            nats_url, prefix=prefix, duplicate_window=0.2
        ) as cold:  # a new process, cache empty
            assert await cold.append("agent.r1", single, 2) == first_single
            assert await cold.append("agent.r1", batch, 0) == first_batch
        assert await store.head_position() == head
        # Other events at a taken version still conflict.
        with pytest.raises(
            WrongExpectedVersionError, match="expected version 2, stream is at version 3"
        ):
            await store.append("agent.r1", note(4), 2)


async def test_a_duplicate_inside_the_window_from_another_store_returns_the_first_result(
    nats_url: str, prefix: str
) -> None:
    async with (
        await JetStreamEventStore.connect(nats_url, prefix=prefix) as a,
        await JetStreamEventStore.connect(nats_url, prefix=prefix) as b,
    ):
        single, batch = note(1), [note(2), note(3)]
        first_single = await a.append("agent.d1", single, ANY)
        first_batch = await a.append("agent.d1", batch, ANY)
        await a.append("agent.d1", note(4), ANY)
        head = await a.head_position()
        # b's cache is cold; JetStream answers `duplicate` (single) or 10201 (batch).
        assert await b.append("agent.d1", single, ANY) == first_single
        assert await b.append("agent.d1", batch, ANY) == first_batch
        assert await a.head_position() == head
        with pytest.raises(DuplicateEventError, match=r"stored before in stream 'agent\.d1'"):
            await b.append("agent.other", single, ANY)


async def test_batches_under_concurrent_writers_get_consecutive_positions(
    store: JetStreamEventStore,
) -> None:
    async def batch(i: int) -> None:
        result = await store.append(f"agent.b{i}", [note(i * 10 + k) for k in range(5)])
        assert result.last_position - result.first_position == 4
        events = [e async for e in store.read(f"agent.b{i}")]
        assert [e.position for e in events] == list(
            range(result.first_position, result.last_position + 1)
        )

    async def single(i: int) -> None:
        await store.append("agent.singles", note(i))

    await asyncio.gather(*(batch(i) for i in range(20)), *(single(i) for i in range(40)))
    singles = [e async for e in store.read("agent.singles")]
    assert [e.version for e in singles] == list(range(1, 41))


async def test_atomic_batches_store_all_or_nothing_and_map_the_server_errors(
    store: JetStreamEventStore, nc: nats.NATS, prefix: str
) -> None:
    await store.ensure_stream()
    subject = f"{prefix}.ev.agent.x1"
    ack = await publish_atomic_batch(
        nc,
        [(subject, b"1", {h.EXPECTED_LAST_SUBJECT_SEQUENCE: "0", h.MSG_ID: "m1"})]
        + [(subject, str(i).encode(), {h.MSG_ID: f"m{i}"}) for i in range(2, 6)],
    )
    assert ack.count == 5 and ack.batch
    head = await store.head_position()
    assert head == ack.seq
    with pytest.raises(WrongLastSequenceError, match="wrong last sequence") as caught:
        await publish_atomic_batch(
            nc,
            [(subject, b"6", {h.EXPECTED_LAST_SUBJECT_SEQUENCE: "1"}), (subject, b"7", {})],
        )
    assert caught.value.last_sequence == ack.seq and caught.value.err_code == 10071
    with pytest.raises(BatchDuplicateIdError, match="duplicate message id"):
        await publish_atomic_batch(nc, [(subject, b"8", {h.MSG_ID: "new"}), (subject, b"9", {})])
        await publish_atomic_batch(nc, [(subject, b"8", {h.MSG_ID: "m3"}), (subject, b"9", {})])
    assert await store.head_position() == head + 2  # only the first of those two batches

    plain = f"{prefix}plain"
    await nc.jetstream().add_stream(
        StreamConfig(name=plain.upper(), subjects=[f"{plain}.>"], storage=StorageType.FILE)
    )
    with pytest.raises(AtomicBatchUnsupportedError, match="allow_atomic off"):
        await publish_atomic_batch(nc, [(f"{plain}.a", b"1", {}), (f"{plain}.a", b"2", {})])
    assert (await nc.jetstream().stream_info(plain.upper())).state.messages == 0
    await nc.jetstream().delete_stream(plain.upper())


async def test_a_foreign_message_at_the_end_of_a_stream_keeps_versions_right(
    store: JetStreamEventStore, nc: nats.NATS, nats_url: str, prefix: str
) -> None:
    reports = []
    store.on_invalid = reports.append
    await store.append("agent.f1", [note(1), note(2)], NO_STREAM)
    junk = await nc.jetstream().publish(f"{prefix}.ev.agent.f1", b"{not an envelope")
    async with await JetStreamEventStore.connect(nats_url, prefix=prefix) as cold:
        assert await cold.stream_version("agent.f1") == 2
        result = await cold.append("agent.f1", note(3), 2)
        assert result.version == 3 and result.position == junk.seq + 1
    assert [e.version async for e in store.read("agent.f1")] == [1, 2, 3]
    assert [r.position for r in reports] == [junk.seq]


async def test_read_all_stops_at_the_head_it_saw_and_filters_several_streams_on_the_server(
    store: JetStreamEventStore,
) -> None:
    for i in range(30):
        await store.append(f"agent.h{i % 3}", note(i))
    seen = []
    async for event in store.read_all(filter=EventFilter(streams=("agent.h0", "agent.h2"))):
        seen.append(event.data["n"])
        if len(seen) == 1:
            await store.append("agent.h0", note(100))  # after the call began: not included
    assert seen == [i for i in range(30) if i % 3 != 1]
    tail = [e.data["n"] async for e in store.read_all(filter=EventFilter(streams=("agent.h0",)))]
    assert tail[-1] == 100


async def _true(condition: bool) -> bool:
    return condition


async def test_reads_far_into_a_long_stream_seek_instead_of_scanning_and_stay_exact(
    store: JetStreamEventStore,
) -> None:
    for start in range(0, 900, 150):
        await store.append("agent.long", [note(n) for n in range(start + 1, start + 151)])
        await store.append("agent.noise", [note(-n) for n in range(50)])

    async def versions(*args: object, **kwargs: object) -> list[int]:
        return [e.version async for e in store.read("agent.long", *args, **kwargs)]  # type: ignore[arg-type]

    assert await versions(450, 5) == [450, 451, 452, 453, 454]
    assert await versions(899) == [899, 900]
    assert await versions(901) == []
    assert await versions(backwards=True, limit=3) == [900, 899, 898]
    assert await versions(500, 4, backwards=True) == [500, 499, 498, 497]
    assert await versions(257, 2) == [257, 258]
    assert len(await versions(300)) == 601


async def test_a_store_on_a_borrowed_client_provisions_lazily_and_leaves_the_client_open(
    nats_url: str, prefix: str
) -> None:
    client = await nats.connect(nats_url)
    store = JetStreamEventStore(client, prefix=prefix)
    result = await store.append("agent.l1", note(1))  # provisions the stream on first use
    assert result.version == 1
    await store.close()
    assert client.is_connected  # not ours to close
    other = JetStreamEventStore(client, prefix=prefix)
    assert await other.stream_version("agent.l1") == 1
    await client.close()
    with pytest.raises(StoreConnectionClosedError, match="will not reconnect") as caught:
        await other.append("agent.l1", note(2))
    assert not caught.value.retryable  # a closed client never comes back: waiting cannot help
    await other.close()


@pytest.mark.parametrize("first", ["read", "read_all", "subscribe", "head_position"])
async def test_any_first_operation_of_a_borrowed_store_provisions_the_stream(
    nc: nats.NATS, prefix: str, first: str
) -> None:
    async with JetStreamEventStore(nc, prefix=prefix) as store:
        if first == "read":
            assert [event async for event in store.read("agent.p1")] == []
        elif first == "read_all":
            assert [event async for event in store.read_all()] == []
        elif first == "subscribe":
            async with store.subscribe() as sub:
                await store.append("agent.p1", note(1))
                got = await asyncio.wait_for(anext(sub), 10.0)
                assert got.data == {"n": 1}
        else:
            assert await store.head_position() == 0
    info = await nc.jetstream().stream_info(f"{prefix.upper()}_EVENTS")
    assert info.config.subjects == [f"{prefix}.ev.>"]


async def test_a_subscriber_gets_megabytes_of_events_in_order_through_flow_control(
    store: JetStreamEventStore,
) -> None:
    blob = "x" * 4000  # 2000 events of 4 kB: enough for the server to ask for flow control
    for b in range(20):
        await store.append(
            f"agent.big{b}", [note(b * 100 + i, metadata={"blob": blob}) for i in range(100)]
        )
    got: list[int] = []
    async with store.subscribe() as subscription:
        async for event in subscription:
            got.append(event.data["n"])
            if len(got) == 2000:
                break
    assert got == list(range(2000))


async def test_closing_the_store_ends_its_live_subscriptions_and_reads_and_drops_their_consumers(
    nats_url: str, prefix: str, nc: nats.NATS
) -> None:
    store = await JetStreamEventStore.connect(nats_url, prefix=prefix)
    await store.append("agent.c1", [note(n) for n in range(3)])
    await nc.jetstream().account_info()  # the client's own request inbox (a task) exists now
    before = asyncio.all_tasks()
    followed: list[int] = []
    read: list[int] = []
    resume_reading = asyncio.Event()

    async def follow() -> None:
        async with store.subscribe() as subscription:
            async for event in subscription:
                followed.append(event.data["n"])

    async def read_some() -> None:
        async for event in store.read_all():
            read.append(event.data["n"])
            await resume_reading.wait()  # paused mid-read: the rest is already on its way

    follower = asyncio.create_task(follow())
    reader = asyncio.create_task(read_some())
    await wait_for(lambda: _true(len(followed) == 3 and len(read) == 1))
    info = await nc.jetstream().stream_info(store.stream_name)
    assert info.state.consumer_count == 2
    await store.close()
    resume_reading.set()
    # Both end with StoreClosedError (a read cut short must not look complete).
    for task in (follower, reader):
        with pytest.raises(StoreClosedError, match="JetStreamEventStore is closed"):
            await asyncio.wait_for(task, 10)
    assert read == [0]
    await wait_for(lambda: _true(not (asyncio.all_tasks() - before)))
    info = await nc.jetstream().stream_info(store.stream_name)
    assert info.state.consumer_count == 0  # deleted on close, not left to expire


async def test_closing_while_the_stream_is_provisioned_starts_nothing_and_fails_the_provisioning(
    nc: nats.NATS, prefix: str
) -> None:
    store = JetStreamEventStore(nc, prefix=prefix)
    await nc.jetstream().account_info()  # the client's own request inbox (a task) exists now
    before = asyncio.all_tasks()
    sent = nc.stats["out_msgs"]
    provisioning = asyncio.create_task(store.ensure_stream())
    # Close as soon as its first JetStream API request is out (it then waits for the answer).
    await wait_for(lambda: _true(nc.stats["out_msgs"] > sent), interval=0)
    await store.close()
    with pytest.raises(StoreClosedError, match="JetStreamEventStore is closed"):
        await provisioning
    # No acknowledgement inbox or sweeper task was started after close.
    await wait_for(lambda: _true(not (asyncio.all_tasks() - before - {provisioning})))
    with pytest.raises(StoreClosedError):
        await store.ensure_stream()


@pytest.fixture
def local_time_five_hours_behind_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is UTC-5, so mixing up naive local and UTC shows."""
    monkeypatch.setenv("TZ", "FST+05")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_five_hours_behind_utc")
async def test_naive_since_and_until_both_mean_utc_and_aware_ones_their_own_zone(
    store: JetStreamEventStore,
) -> None:
    await store.append("agent.t1", [note(1), note(2)])
    middle = datetime.now(UTC)
    await wait_for(lambda: _true(datetime.now(UTC) > middle + timedelta(milliseconds=5)))
    await store.append("agent.t1", [note(3), note(4)])

    async def window(**bounds: datetime) -> list[int]:
        return [e.data["n"] async for e in store.read_all(**bounds)]  # type: ignore[arg-type]

    naive = middle.replace(tzinfo=None)
    assert await window(since=naive) == [3, 4]
    assert await window(until=naive) == [1, 2]
    elsewhere = middle.astimezone(timezone(timedelta(hours=2)))
    assert await window(since=elsewhere) == [3, 4]
    assert await window(until=elsewhere) == [1, 2]
