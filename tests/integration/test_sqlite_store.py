"""What only the SQLite backend shows: group commit, several instances and processes on one file,
close with appends pending, reopening, paging, and rows that are not valid events."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from newfuse.errors import (
    ConfigError,
    DuplicateEventError,
    SQLiteStoreError,
    StoreClosedError,
    StoreUnavailableError,
    WrongExpectedVersionError,
)
from newfuse.eventstore import (
    NO_STREAM,
    AppendResult,
    EventFilter,
    InvalidEventReport,
    open_event_store,
)
from newfuse.eventstore.sqlite import SQLiteEventStore
from newfuse.schemas import (
    ENVELOPE_ENCODER,
    Envelope,
    NewEvent,
    RecordedEvent,
    default_registry,
)
from support import wait_for


def note(n: int, **fields: str) -> NewEvent:
    return NewEvent(type="note", data={"n": n}, **fields)  # type: ignore[arg-type]


async def numbers(events: AsyncIterator[RecordedEvent]) -> list[int]:
    return [event.data["n"] async for event in events]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SQLiteEventStore]:
    opened = await SQLiteEventStore.open(str(db))
    yield opened
    await opened.close()


def hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another connection (as another process would) takes the write lock and keeps it."""
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


def refuse_bad_stream(db: Path) -> None:
    """A failure no check of ours foresees: a trigger refuses every row of `agent.bad`."""
    with contextlib.closing(sqlite3.connect(db)) as other, other:
        other.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.stream = 'agent.bad' "
            "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
        )


async def queued(store: SQLiteEventStore, count: int) -> None:
    """Wait until `count` appends wait in the writer's queue (white box: proves one group)."""

    async def enough() -> bool:
        return len(store._queue) == count

    await wait_for(enough)


# -- group commit ----------------------------------------------------------------------------------


async def test_a_group_commit_fails_or_succeeds_each_append_on_its_own(
    store: SQLiteEventStore, db: Path
) -> None:
    for i in range(10):
        await store.append(f"agent.s{i}", note(0), NO_STREAM)
    retried = [note(100), note(101)]
    statements: list[str] = []
    # The write connection lives on the writer thread: its trace callback is set there.
    assert store._writer is not None and store._write_thread is not None
    await store._on(store._write_thread, store._writer.set_trace_callback, statements.append)
    blocker = hold_write_lock(db)
    try:
        # The writer takes the first append and waits for the lock; the rest queue up behind it
        # and are then committed together in one transaction.
        first = asyncio.create_task(store.append("agent.s0", note(1), 1))
        await wait_for(lambda: _true(not store._queue and bool(store._in_flight)))
        calls = [
            *(store.append(f"agent.s{i}", note(1), 1) for i in range(1, 10)),  # right
            *(store.append(f"agent.s{i}", note(2), 7) for i in range(10)),  # wrong version
            store.append("agent.fresh", note(1), NO_STREAM),  # wins
            store.append("agent.fresh", note(2), NO_STREAM),  # loses to the one before it
            store.append("agent.retried", retried, NO_STREAM),
            store.append("agent.retried", retried, NO_STREAM),  # a retry in the same group
            store.append("agent.s1", note(3), 2),  # right only after the group's earlier append
        ]
        tasks = [asyncio.create_task(call) for call in calls]
        await queued(store, len(tasks))
    finally:
        blocker.rollback()
        blocker.close()
    outcomes = await asyncio.gather(first, *tasks, return_exceptions=True)
    transactions = [sql for sql in statements if sql.startswith(("BEGIN", "COMMIT", "ROLLBACK"))]
    assert transactions == ["BEGIN IMMEDIATE", "COMMIT"] * 2, "not one transaction for the group"
    assert isinstance(outcomes[0], AppendResult) and outcomes[0].version == 2
    right, wrong = outcomes[1:10], outcomes[10:20]
    assert all(isinstance(r, AppendResult) and r.version == 2 for r in right), right
    for i, error in enumerate(wrong):
        assert isinstance(error, WrongExpectedVersionError), error
        assert (error.stream, error.expected, error.actual) == (f"agent.s{i}", 7, 2)
    fresh_won, fresh_lost, retry_first, retry_again, chained = outcomes[20:]
    assert isinstance(fresh_won, AppendResult) and fresh_won.version == 1
    assert isinstance(fresh_lost, WrongExpectedVersionError) and fresh_lost.actual == 1
    assert isinstance(retry_first, AppendResult) and retry_again == retry_first
    assert isinstance(chained, AppendResult) and chained.version == 3

    for i in range(10):
        expected = [0, 1, 3] if i == 1 else [0, 1]
        assert await numbers(store.read(f"agent.s{i}")) == expected
    assert await numbers(store.read("agent.fresh")) == [1]
    assert await numbers(store.read("agent.retried")) == [100, 101]
    positions = [e.position async for e in store.read_all()]
    assert positions == list(range(1, len(positions) + 1)), "positions have gaps"
    assert len(positions) == 10 + 10 + 1 + 2 + 1


async def test_ids_reused_elsewhere_or_twice_in_a_batch_are_refused_naming_the_id(
    store: SQLiteEventStore,
) -> None:
    first = note(1)
    await store.append("agent.a1", [first, note(2)])
    with pytest.raises(
        DuplicateEventError, match=rf"{first.id} was appended before to 'agent\.a1'"
    ):
        await store.append("agent.a2", first)
    again = await store.append("agent.a1", first)  # its own place is found again: a no-op
    assert (again.version, again.position, again.ids) == (1, 1, (first.id,))
    twice = note(3)
    with pytest.raises(DuplicateEventError, match="appears twice in one batch"):
        await store.append("agent.a3", [twice, twice])
    assert await store.head_position() == 2


async def test_many_concurrent_appenders_to_their_own_streams_all_land(
    store: SQLiteEventStore,
) -> None:
    async def appender(i: int) -> list[AppendResult]:
        return [await store.append(f"agent.w{i}", note(n), n) for n in range(20)]

    results = await asyncio.gather(*(appender(i) for i in range(50)))
    for i, mine in enumerate(results):
        assert [r.version for r in mine] == list(range(1, 21))
        assert await numbers(store.read(f"agent.w{i}")) == list(range(20))
    assert await store.head_position() == 50 * 20


async def test_a_failed_group_transaction_is_retried_one_append_at_a_time(
    store: SQLiteEventStore, db: Path
) -> None:
    for i in range(3):
        await store.append(f"agent.g{i}", note(0), NO_STREAM)
    refuse_bad_stream(db)
    statements: list[str] = []
    assert store._writer is not None and store._write_thread is not None
    await store._on(store._write_thread, store._writer.set_trace_callback, statements.append)
    blocker = hold_write_lock(db)
    try:
        first = asyncio.create_task(store.append("agent.g0", note(1), 1))
        await wait_for(lambda: _true(not store._queue and bool(store._in_flight)))
        calls = [
            store.append("agent.g1", note(1), 1),
            store.append("agent.bad", note(1)),
            store.append("agent.g2", note(1), 1),
        ]
        tasks = [asyncio.create_task(call) for call in calls]
        await queued(store, len(tasks))
    finally:
        blocker.rollback()
        blocker.close()
    outcomes = await asyncio.gather(first, *tasks, return_exceptions=True)
    assert isinstance(outcomes[0], AppendResult)
    good_one, bad, good_two = outcomes[1:]
    assert isinstance(bad, SQLiteStoreError) and "refused by a trigger" in str(bad), bad
    assert isinstance(bad.__cause__, sqlite3.IntegrityError)  # SQLite's own error, kept
    assert isinstance(good_one, AppendResult) and good_one.version == 2
    assert isinstance(good_two, AppendResult) and good_two.version == 2
    transactions = [sql for sql in statements if sql.startswith(("BEGIN", "COMMIT", "ROLLBACK"))]
    # The first group, the failed group of three, then each of the three on its own.
    assert transactions == [
        *("BEGIN IMMEDIATE", "COMMIT"),
        *("BEGIN IMMEDIATE", "ROLLBACK"),
        *("BEGIN IMMEDIATE", "COMMIT"),
        *("BEGIN IMMEDIATE", "ROLLBACK"),
        *("BEGIN IMMEDIATE", "COMMIT"),
    ]
    assert await numbers(store.read("agent.g1")) == [0, 1]
    assert await numbers(store.read("agent.bad")) == []
    positions = [e.position async for e in store.read_all()]
    assert positions == list(range(1, 7)), "positions have gaps"


async def test_a_write_lock_held_past_busy_timeout_fails_the_append_retryably(db: Path) -> None:
    store = await SQLiteEventStore.open(str(db), busy_timeout=0.2)
    try:
        blocker = hold_write_lock(db)
        try:
            with pytest.raises(StoreUnavailableError, match="database is locked") as caught:
                await store.append("agent.l1", note(1))
            assert caught.value.retryable
        finally:
            blocker.rollback()
            blocker.close()
        assert (await store.append("agent.l1", note(2), NO_STREAM)).version == 1
        assert await numbers(store.read("agent.l1")) == [2]
    finally:
        await store.close()


# -- inline commits --------------------------------------------------------------------------------


def inline_writes(store: SQLiteEventStore) -> int:
    """Rows the inline (event loop) connection has written (white box: which path committed)."""
    assert store._inline is not None
    return store._inline.total_changes


async def writer_idle(store: SQLiteEventStore) -> None:
    """Wait until the writer thread has finished its drain: an append settled by it may resume
    its caller before the drain lets go, and the caller's next append would queue behind it."""
    assert store._write_thread is not None
    await store._on(store._write_thread, lambda: None)


async def test_only_a_commit_without_fsync_runs_inline(db: Path, tmp_path: Path) -> None:
    for synchronous, inline, expected in (
        ("FULL", True, False),
        ("EXTRA", True, False),
        ("NORMAL", False, False),
        ("NORMAL", True, True),
        ("OFF", True, True),
    ):
        store = await SQLiteEventStore.open(
            str(tmp_path / f"{synchronous}-{inline}.db"),
            synchronous=synchronous,
            inline_commits=inline,
        )
        try:
            assert store.inline_commits is expected, (synchronous, inline)
            assert (store._inline is not None) is expected
            result = await store.append("agent.a", note(1), NO_STREAM)
            assert (result.version, result.position) == (1, 1)
        finally:
            await store.close()
    memory = await SQLiteEventStore.open(":memory:", synchronous="NORMAL")
    try:
        assert not memory.inline_commits  # one connection only: reads share its thread
    finally:
        await memory.close()


async def test_a_lone_append_commits_inline_and_overlapping_ones_commit_as_one_group(
    db: Path,
) -> None:
    store = await SQLiteEventStore.open(str(db), synchronous="NORMAL")
    try:
        assert store._inline is not None
        statements: list[str] = []
        store._inline.set_trace_callback(statements.append)
        for version in range(3):
            await store.append("agent.lone", note(version), version)
        assert inline_writes(store) == 3
        # 16 at once: the first finds no other append and commits at once; the other 15 arrive
        # while it is still inside append, queue in that loop turn and commit as one group.
        statements.clear()
        results = await asyncio.gather(
            *(store.append(f"agent.s{i}", note(i), NO_STREAM) for i in range(16))
        )
        assert inline_writes(store) == 19
        assert [sql for sql in statements if sql == "COMMIT"] == ["COMMIT"] * 2
        assert sorted(r.position for r in results) == list(range(4, 20))
        # too large to block the loop for: the writer thread
        await store.append("agent.big", [note(i) for i in range(17)], NO_STREAM)
        assert inline_writes(store) == 19
        await writer_idle(store)
        # more than an inline transaction takes at once: several groups, in order
        results = await asyncio.gather(
            *(store.append(f"agent.t{i}", note(i), NO_STREAM) for i in range(40))
        )
        assert [r.position for r in results] == list(range(37, 77))
        assert await numbers(store.read("agent.lone")) == [0, 1, 2]
        assert len([e async for e in store.read_all()]) == 76
    finally:
        await store.close()


async def test_an_inline_append_that_finds_the_write_lock_taken_waits_on_the_writer_thread(
    db: Path,
) -> None:
    store = await SQLiteEventStore.open(str(db), synchronous="NORMAL", busy_timeout=30.0)
    try:
        await store.append("agent.a", note(1), NO_STREAM)
        blocker = hold_write_lock(db)
        try:
            waiting = asyncio.create_task(store.append("agent.a", note(2), 1))
            # the inline attempt fails at once (no busy wait on the loop); the writer thread
            # takes the append and waits for the lock while the loop goes on
            await wait_for(lambda: _true(bool(store._in_flight)))
            assert not waiting.done()
        finally:
            blocker.rollback()
            blocker.close()
        assert (await waiting).version == 2
        assert inline_writes(store) == 1  # only the first
        await writer_idle(store)
        # the lock is free again: the next lone append is inline once more
        await store.append("agent.a", note(3), 2)
        assert inline_writes(store) == 2
        assert await numbers(store.read("agent.a")) == [1, 2, 3]
    finally:
        await store.close()


async def test_inline_commits_keep_the_wal_checkpointed(db: Path) -> None:
    """The inline connection does not checkpoint (that fsyncs); the writer thread does, between
    commits, so the WAL is reused instead of growing with every commit (about 17 KB each)."""
    store = await SQLiteEventStore.open(str(db), synchronous="NORMAL")
    try:
        for version in range(1500):
            await store.append("agent.a", note(version), version)
        assert inline_writes(store) > 1000  # a checkpoint's append goes to the thread
        wal = db.with_name(db.name + "-wal").stat().st_size
        assert wal < 12 * 1024 * 1024, f"the WAL grew to {wal} bytes"
        assert len(await numbers(store.read("agent.a"))) == 1500
    finally:
        await store.close()


async def test_a_failed_inline_commit_fails_its_append_and_leaves_the_store_usable(
    db: Path,
) -> None:
    inline = await SQLiteEventStore.open(str(db), synchronous="NORMAL")
    try:
        await inline.append("agent.ok", note(1), NO_STREAM)
        refuse_bad_stream(db)
        with pytest.raises(SQLiteStoreError, match="refused by a trigger"):
            await inline.append("agent.bad", note(1), NO_STREAM)
        await writer_idle(inline)  # the failed group was done again there
        assert (await inline.append("agent.ok", note(2), 1)).version == 2
        assert await inline.stream_version("agent.bad") == 0
        assert inline_writes(inline) == 2
    finally:
        await inline.close()


# -- several instances, several processes ----------------------------------------------------------


async def test_two_instances_on_one_file_keep_versions_unique(db: Path) -> None:
    one = await SQLiteEventStore.open(str(db))
    two = await SQLiteEventStore.open(str(db))
    try:
        await asyncio.gather(
            *(store.append("agent.shared", note(n)) for n in range(40) for store in (one, two))
        )
        events = [e async for e in two.read("agent.shared")]
        assert [e.version for e in events] == list(range(1, 81))
        assert [e.position for e in events] == list(range(1, 81))
        with pytest.raises(
            WrongExpectedVersionError, match="expected version 79, stream is at version 80"
        ):
            await one.append("agent.shared", note(99), 79)
    finally:
        await one.close()
        await two.close()


WRITER_PROCESS = """
import asyncio, sys
from newfuse.eventstore.sqlite import SQLiteEventStore
from newfuse.schemas import NewEvent

async def main(path: str, count: int) -> None:
    store = await SQLiteEventStore.open(path)
    for n in range(count):
        await store.append("agent.shared", NewEvent(type="note", data={"n": 1000 + n}))
    await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_another_process_writing_the_file_keeps_versions_unique_and_reaches_subscribers(
    store: SQLiteEventStore, db: Path
) -> None:
    count = 150
    seen: list[RecordedEvent] = []

    async def follow() -> None:
        async with store.subscribe(EventFilter(streams=("agent.shared",))) as subscription:
            async for event in subscription:
                seen.append(event)
                if len(seen) == 2 * count:
                    return

    follower = asyncio.create_task(follow())
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER_PROCESS, str(db), str(count)
    )
    try:
        for n in range(count):
            await store.append("agent.shared", note(n))
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await asyncio.wait_for(follower, 30)
    assert [e.version for e in seen] == list(range(1, 2 * count + 1))
    assert [e.position for e in seen] == list(range(1, 2 * count + 1))
    assert sorted(e.data["n"] for e in seen) == sorted([*range(count), *range(1000, 1000 + count)])


# -- closing and reopening -------------------------------------------------------------------------


async def test_close_fails_queued_appends_finishes_the_one_in_flight_and_wakes_subscribers(
    db: Path,
) -> None:
    store = await SQLiteEventStore.open(str(db), busy_timeout=30)
    subscription = store.subscribe()
    following = asyncio.create_task(anext(subscription))
    blocker = hold_write_lock(db)
    try:
        in_flight = asyncio.create_task(store.append("agent.a0", note(0)))
        await wait_for(lambda: _true(not store._queue and bool(store._in_flight)))
        waiting = [asyncio.create_task(store.append(f"agent.a{i}", note(i))) for i in range(1, 20)]
        await queued(store, len(waiting))
        closing = asyncio.create_task(store.close())
        failed = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(error, StoreClosedError) for error in failed), failed
        assert not in_flight.done()
    finally:
        blocker.rollback()
        blocker.close()
    assert (await in_flight).version == 1
    await closing
    with pytest.raises(StoreClosedError, match="is closed"):
        await following
    with pytest.raises(StoreClosedError):
        await store.append("agent.a0", note(1))
    await store.close()  # idempotent

    reopened = await SQLiteEventStore.open(str(db))
    try:
        assert await numbers(reopened.read_all()) == [0]
    finally:
        await reopened.close()


async def test_reopening_the_file_keeps_events_versions_positions_and_idempotency(db: Path) -> None:
    first = await open_event_store(f"sqlite://{db}")
    batch = [note(1), note(2, correlation_id="c-1")]
    original = await first.append("agent.a1", batch, NO_STREAM)
    await first.append("saga.s1", note(3))
    before = [e.to_wire() async for e in first.read_all()]
    envelopes = [ENVELOPE_ENCODER.encode(e.envelope) async for e in first.read_all()]
    await first.close()
    with contextlib.closing(sqlite3.connect(db)) as raw:  # the body is the wire JSON, as is
        assert [body for (body,) in raw.execute("SELECT body FROM events")] == envelopes

    second = await open_event_store(f"sqlite://{db}")
    try:
        assert [e.to_wire() async for e in second.read_all()] == before
        assert await second.head_position() == 3
        assert await second.stream_version("agent.a1") == 2
        assert await second.append("agent.a1", batch, NO_STREAM) == original
        result = await second.append("agent.a1", note(4), 2)
        assert (result.version, result.position) == (3, 4)
        correlated = second.read_all(filter=EventFilter(correlation_id="c-1"))
        assert await numbers(correlated) == [2]
    finally:
        await second.close()


async def test_an_in_memory_store_appends_reads_and_follows_on_its_one_connection() -> None:
    store = await open_event_store("sqlite://:memory:")
    try:
        seen: list[int] = []

        async def follow() -> None:
            async for event in store.subscribe():
                seen.append(event.data["n"])
                if len(seen) == 100:
                    return

        follower = asyncio.create_task(follow())
        await asyncio.gather(*(store.append(f"agent.m{n % 7}", note(n)) for n in range(100)))
        await asyncio.wait_for(follower, 10)
        assert sorted(seen) == list(range(100))
        assert await store.head_position() == 100
        assert len([e async for e in store.read("agent.m0")]) == 15
    finally:
        await store.close()


# -- reading in pages ------------------------------------------------------------------------------


async def test_a_stream_read_asks_one_query_per_page_and_none_for_an_empty_last_page(
    db: Path,
) -> None:
    store = await SQLiteEventStore.open(str(db), page_size=4)
    try:
        await store.append("agent.r", [note(n) for n in range(8)])  # exactly two pages
        statements: list[str] = []
        assert store._reader is not None and store._read_thread is not None
        await store._on(store._read_thread, store._reader.set_trace_callback, statements.append)
        assert await numbers(store.read("agent.r")) == list(range(8))
        assert await numbers(store.read("agent.r", backwards=True)) == list(reversed(range(8)))
        assert await numbers(store.read("agent.r", from_version=3, limit=4)) == [2, 3, 4, 5]
        selects = [sql for sql in statements if sql.lstrip().startswith("SELECT")]
        assert len(selects) == 2 + 2 + 1, selects
    finally:
        await store.close()


async def test_reads_cross_page_and_window_boundaries_without_losing_or_repeating(
    db: Path,
) -> None:
    store = await SQLiteEventStore.open(str(db), page_size=3)  # windows of 60 positions
    try:
        for start in range(0, 200, 10):
            category = ("agent", "saga", "task")[start // 10 % 3]
            await store.append(f"{category}.x", [note(n) for n in range(start, start + 10)])
        everything = await numbers(store.read_all())
        assert everything == list(range(200))
        assert await numbers(store.read_all(from_position=57, limit=8)) == list(range(56, 64))
        two = EventFilter(categories=("agent", "task"))
        expected = [n for n in range(200) if n // 10 % 3 != 1]
        assert await numbers(store.read_all(filter=two)) == expected
        assert await numbers(store.read_all(filter=two, limit=13)) == expected[:13]
        in_pages = await numbers(store.read("agent.x", from_version=5, limit=7))
        assert in_pages == [*range(4, 10), 30]
        backwards = await numbers(store.read("saga.x", backwards=True))
        assert backwards == [n for n in reversed(range(200)) if n // 10 % 3 == 1]
        got: list[int] = []
        async with store.subscribe(two, from_position=150) as subscription:
            async for event in subscription:
                got.append(event.data["n"])
                if event.data["n"] == expected[-1]:
                    break
        assert got == [n for n in expected if n >= 149]
    finally:
        await store.close()


async def test_a_row_that_is_not_a_valid_event_is_reported_and_skipped(db: Path) -> None:
    reports: list[InvalidEventReport] = []
    store = await SQLiteEventStore.open(str(db), on_invalid=reports.append)
    try:
        await store.append("agent.a1", note(1))
        with contextlib.closing(sqlite3.connect(db)) as other, other:  # a foreign writer: garbage
            other.execute(
                "INSERT INTO events (position, stream, category, version, id, type, "
                "schema_version, timestamp, correlation_id, body) "
                "VALUES (2, 'agent.a1', 'agent', 2, 'bad', 'note', 1, 0, NULL, ?)",
                (b'{"not": "an envelope"}',),
            )
        await store.append("agent.a1", note(3))
        assert await numbers(store.read_all()) == [1, 3]
        assert await numbers(store.read("agent.a1")) == [1, 3]
        assert [r.position for r in reports] == [2, 2]
        assert f"invalid envelope in SQLite event store {db}" in reports[0].error
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("synchronous", "SOMETIMES", "synchronous"), ("busy_timeout", 0, "busy_timeout")],
)
async def test_unusable_options_are_refused_naming_them(
    db: Path, option: str, value: object, named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        await SQLiteEventStore.open(str(db), **{option: value})  # type: ignore[arg-type]
    assert not await asyncio.to_thread(db.exists)


async def _true(condition: bool) -> bool:
    return condition


async def test_a_row_whose_envelope_disagrees_with_its_row_is_reported_and_skipped(
    db: Path,
) -> None:
    """The row's stream and version are the event's place (its writer holds the lock and
    UNIQUE(stream, version)); a body that names another stream or version is not that event."""
    reports: list[InvalidEventReport] = []
    store = await SQLiteEventStore.open(str(db), on_invalid=reports.append)
    try:
        first = await store.append("agent.a1", note(1))
        [stored] = [e async for e in store.read("agent.a1")]
        elsewhere = msgspec.json.encode(msgspec.structs.replace(stored.envelope, stream="agent.zz"))
        later = msgspec.json.encode(msgspec.structs.replace(stored.envelope, version=9))
        with contextlib.closing(sqlite3.connect(db)) as other, other:  # a foreign writer
            for position, body in ((2, elsewhere), (3, later)):
                other.execute(
                    "INSERT INTO events (position, stream, category, version, id, type, "
                    "schema_version, timestamp, correlation_id, body) "
                    "VALUES (?, 'agent.a1', 'agent', ?, ?, 'note', 1, 0, NULL, ?)",
                    (position, position, f"forged-{position}", body),
                )
        assert [e.position async for e in store.read_all()] == [first.position]
        assert [e.position async for e in store.read("agent.a1")] == [first.position]
        assert [r.position for r in reports] == [2, 3, 2, 3]
        assert (
            "stream 'agent.zz' is not the stream it is stored under ('agent.a1')"
            in reports[0].error
        )
        assert "version 9 is not the version of its row (3)" in reports[1].error
    finally:
        await store.close()


class OrderV1(msgspec.Struct, frozen=True):
    id: str


class OrderV2(msgspec.Struct, frozen=True):
    order_id: str
    lines: list[str]


async def test_a_page_mixing_newest_old_unregistered_and_invalid_payloads_reads_each_right(
    db: Path,
) -> None:
    """The read's inline path takes only the newest version of a registered type; an older one
    is upcast, an unregistered one comes back as JSON, and a payload its schema refuses is
    reported and skipped, each in its place in one page."""
    old = default_registry()
    old.add("order.placed", 1, OrderV1)
    writer = await SQLiteEventStore.open(str(db), registry=old)
    try:
        await writer.append("order.o1", NewEvent(data=OrderV1(id="a")), NO_STREAM)
        await writer.append("order.o1", note(7), 1)
        await writer.append("order.o1", NewEvent(data=OrderV1(id="b")), 2)
    finally:
        await writer.close()
    new = default_registry()
    new.add("order.placed", 1, OrderV1)
    new.add("order.placed", 2, OrderV2)
    new.upcaster("order.placed", 1)(lambda v1: {"order_id": v1["id"], "lines": []})
    with contextlib.closing(sqlite3.connect(db)) as other, other:  # v2 rows, one of them invalid
        for position, data in ((4, b'{"order_id":"c","lines":["x"]}'), (5, b'{"order_id":5}')):
            body = ENVELOPE_ENCODER.encode(
                msgspec.structs.replace(
                    _first_envelope(db),
                    id=f"forged-{position}",
                    version=position,
                    schema_version=2,
                    data=msgspec.Raw(data),
                )
            )
            other.execute(
                "INSERT INTO events (position, stream, category, version, id, type, "
                "schema_version, timestamp, correlation_id, body) "
                "VALUES (?, 'order.o1', 'order', ?, ?, 'order.placed', 2, 0, NULL, ?)",
                (position, position, f"forged-{position}", body),
            )
    reports: list[InvalidEventReport] = []
    reader = await SQLiteEventStore.open(str(db), registry=new, on_invalid=reports.append)
    try:
        for events in (reader.read_all(), reader.read("order.o1")):
            assert [e.data async for e in events] == [
                OrderV2(order_id="a", lines=[]),
                {"n": 7},
                OrderV2(order_id="b", lines=[]),
                OrderV2(order_id="c", lines=["x"]),
            ]
        assert [r.position for r in reports] == [5, 5]
        assert "order.placed" in reports[0].error and "$.order_id" in reports[0].error
    finally:
        await reader.close()


def _first_envelope(db: Path) -> Envelope:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        (body,) = connection.execute("SELECT body FROM events WHERE position = 1").fetchone()
    return msgspec.json.decode(body, type=Envelope)


async def test_a_row_nested_deeper_than_the_decoder_can_take_is_reported_and_skipped(
    db: Path,
) -> None:
    reports: list[InvalidEventReport] = []
    store = await SQLiteEventStore.open(str(db), on_invalid=reports.append)
    try:
        await store.append("agent.a1", note(1))
        deep = (
            b'{"id":"deep","stream":"agent.a1","type":"note","version":2,'
            b'"timestamp":"2026-12-02T12:00:00Z","data":' + b"[" * 5000 + b"]" * 5000 + b"}"
        )
        with contextlib.closing(sqlite3.connect(db)) as other, other:  # a foreign writer
            other.execute(
                "INSERT INTO events (position, stream, category, version, id, type, "
                "schema_version, timestamp, correlation_id, body) "
                "VALUES (2, 'agent.a1', 'agent', 2, 'deep', 'note', 1, 0, NULL, ?)",
                (deep,),
            )
        await store.append("agent.a1", note(3))
        assert await numbers(store.read_all()) == [1, 3]
        assert await numbers(store.read("agent.a1")) == [1, 3]
        assert [r.position for r in reports] == [2, 2]
        assert "nested too deep for the decoder" in reports[0].error
    finally:
        await store.close()
