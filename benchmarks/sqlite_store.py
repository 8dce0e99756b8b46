"""SQLite event store benchmark: appends and reads next to the `eventsourcing` library's recorder.

Usage: `python benchmarks/sqlite_store.py [--quick] [--part append|read]
[--synchronous FULL|NORMAL|both]` (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _events import TYPE, decode_typed, ours_append_concurrent, ours_read_all, populate, wire_body
from _harness import (
    Sizes,
    emit,
    parser,
    percentile,
    progress,
    run_benchmark,
    run_id,
    sizes_of,
    timed,
    workdir,
)

from newfuse.eventstore import EventStore, open_event_store
from newfuse.eventstore.sqlite import SQLiteEventStore
from newfuse.schemas import StateUpdate

# -- SQLite vs eventsourcing -----------------------------------------------------------------------
#
# Baseline API: eventsourcing's SQLiteApplicationRecorder.insert_events with StoredEvent, one
# event per call. Its (originator_id, originator_version) primary key is the version check (a
# conflicting version raises IntegrityError), and the application recorder's rowid is a global
# order as our positions are: the same contract as "append one event to a stream with a version
# check", without an Application's aggregate, snapshot and transcoder work that we do not do.
# The datastore is the one PERSISTENCE_MODULE=eventsourcing.sqlite + SQLITE_DBNAME builds; it is
# constructed directly only to size its connection pool to the thread count (the factory fixes
# 5 + 10 overflow, which makes extra threads wait or reconnect). Its connections keep SQLite's
# default synchronous=FULL in WAL mode, as ours do: one fsync per commit on both sides. With
# `--synchronous NORMAL` both sides run NORMAL (no fsync at commit, only at checkpoints): ours
# through its `synchronous` option, eventsourcing (which has no such setting) by a PRAGMA on each
# connection its pool creates.

SYNCHRONOUS = ("FULL", "NORMAL")
"""The durability modes the append lines run in; FULL keeps the plain line names."""


class EventsourcingSide:
    """eventsourcing's SQLite recorder on its own database file."""

    def __init__(self, path: Path, pool_size: int, synchronous: str = "FULL") -> None:
        from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

        self.datastore = SQLiteDatastore(db_name=str(path), pool_size=pool_size, max_overflow=0)
        pool = self.datastore.pool
        create = pool._create_connection

        def create_with_mode() -> object:
            connection = create()
            connection._sqlite_conn.execute(f"PRAGMA synchronous={synchronous}")
            return connection

        pool._create_connection = create_with_mode  # type: ignore[method-assign,assignment]
        self.recorder = SQLiteApplicationRecorder(self.datastore)
        self.recorder.create_table()
        self.save_seconds: list[float] = []  # each insert_events call of the single appender

    def synchronous(self) -> int:
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute("PRAGMA synchronous")
            value: int = cursor.fetchone()[0]
            return value

    def append_stream(
        self, stream_id: uuid.UUID, bodies: list[bytes], per_call: int, clock: bool = False
    ) -> None:
        from eventsourcing.persistence import StoredEvent

        for start in range(0, len(bodies), per_call):
            began = time.perf_counter()
            self.recorder.insert_events(
                [
                    StoredEvent(
                        originator_id=stream_id,
                        originator_version=start + offset + 1,
                        topic=TYPE,
                        state=body,
                    )
                    for offset, body in enumerate(bodies[start : start + per_call])
                ]
            )
            if clock:
                self.save_seconds.append(time.perf_counter() - began)

    def read_all(self, expected: int, page: int = 1000) -> int:
        count = 0
        start = 1
        while True:
            notifications = self.recorder.select_notifications(start=start, limit=page)
            if not notifications:
                break
            for notification in notifications:
                decode_typed(notification.state)
                count += 1
            start = notifications[-1].id + 1
        if count != expected:
            raise AssertionError(f"eventsourcing read {count} events, {expected} were stored")
        return count

    def read_streams(self, stream_ids: list[uuid.UUID]) -> int:
        count = 0
        for stream_id in stream_ids:
            for stored in self.recorder.select_events(stream_id):
                decode_typed(stored.state)
                count += 1
        return count

    def close(self) -> None:
        self.datastore.close()


def journal_mode(path: Path) -> str:
    """The journal mode stored in a database file (synchronous is per connection, see above)."""
    with sqlite3.connect(path) as connection:
        mode: str = connection.execute("PRAGMA journal_mode").fetchone()[0]
    return mode


async def ours_sqlite_append(store: EventStore, appenders: int, total: int) -> tuple[int, float]:
    return await ours_append_concurrent(store, appenders, total)


def clock_inline_commits(store: EventStore) -> list[float]:
    """The seconds each inline drain of `store` (one transaction on the event loop, settled)
    blocks the loop, as they happen (white box: it wraps the store's `_drain_on_loop`)."""
    seconds: list[float] = []
    drain = getattr(store, "_drain_on_loop", None)  # None: a store without inline commits
    if not isinstance(store, SQLiteEventStore) or drain is None:
        return seconds

    def clocked() -> None:
        began = time.perf_counter()
        drain()
        seconds.append(time.perf_counter() - began)

    store._drain_on_loop = clocked  # type: ignore[method-assign]
    return seconds


async def es_sqlite_append(
    side: EventsourcingSide, appenders: int, total: int
) -> tuple[int, float]:
    """`appenders` threads, each appending one event per call to its own stream."""
    per = max(1, total // appenders)
    rid = run_id()
    streams = [uuid.uuid4() for _ in range(appenders)]
    bodies = [
        [wire_body(f"bench.{rid}-{s}", i + 1, s * per + i)[1] for i in range(per)]
        for s in range(appenders)
    ]

    def run_threads() -> int:
        with ThreadPoolExecutor(appenders) as pool:
            futures = [
                pool.submit(side.append_stream, streams[s], bodies[s], 1, appenders == 1)
                for s in range(appenders)
            ]
            for future in futures:
                future.result()
        return per * appenders

    async def run() -> int:
        return await asyncio.to_thread(run_threads)

    return await timed(run)


async def bench_sqlite_append(workdir: Path, sizes: Sizes, synchronous: str = "FULL") -> None:
    suffix = "" if synchronous == "FULL" else f".{synchronous.lower()}"
    ours_path = workdir / f"ours-append{suffix}.db"
    es_path = workdir / f"es-append{suffix}.db"
    store = await open_event_store(f"sqlite://{ours_path}", synchronous=synchronous)
    es = EventsourcingSide(es_path, pool_size=sizes.sqlite_appenders, synchronous=synchronous)
    try:
        progress(
            f"sqlite: journal {journal_mode(ours_path)} (ours) / "
            f"{journal_mode(es_path)} (eventsourcing), eventsourcing synchronous="
            f"{es.synchronous()} (2 = FULL, 1 = NORMAL), ours synchronous="
            f"{getattr(store, 'synchronous', '?')}, inline commits "
            f"{getattr(store, 'inline_commits', '?')}"
        )
        for label, appenders, total in (
            ("concurrent", sizes.sqlite_appenders, sizes.sqlite_append_events),
            ("single", 1, sizes.sqlite_single_events),
        ):
            progress(f"sqlite append {label}: {appenders} appender(s), {total} events per round")
            await ours_sqlite_append(store, appenders, max(appenders, total // 10))
            await es_sqlite_append(es, appenders, max(appenders, total // 10))
            es.save_seconds.clear()
            inline = clock_inline_commits(store) if appenders == 1 else []
            best = {"ours": 0.0, "eventsourcing": 0.0}
            for round_no in range(sizes.rounds):
                for key in best:
                    if key == "ours":
                        count, seconds = await ours_sqlite_append(store, appenders, total)
                    else:
                        count, seconds = await es_sqlite_append(es, appenders, total)
                    best[key] = max(best[key], count / seconds)
                    progress(f"  round {round_no + 1} {key}: {count / seconds:,.0f} events/s")
            emit(
                f"sqlite.append.{label}{suffix}",
                best["ours"],
                best["eventsourcing"],
                f"events/s ({appenders} appender(s), 1 event per append, expected version, "
                f"synchronous={synchronous}; baseline: eventsourcing SQLiteApplicationRecorder)",
                n=total,
                lower_is_better=False,
            )
            if inline:
                emit_inline(inline, es.save_seconds, synchronous)
    finally:
        await store.close()
        es.close()


def emit_inline(inline: list[float], saves: list[float], synchronous: str) -> None:
    """How long an inline commit blocks our event loop, next to how long eventsourcing's
    synchronous save blocks its caller (microseconds; ratio = baseline / ours)."""
    inline.sort()
    saves.sort()
    for name, fraction in (("p50", 0.50), ("p99", 0.99)):
        emit(
            f"sqlite.append.inline_commit.{name}",
            percentile(inline, fraction) * 1e6,
            percentile(saves, fraction) * 1e6 if saves else 0.0,
            f"us the event loop is blocked per inline commit (single appender, synchronous="
            f"{synchronous}); baseline: eventsourcing insert_events in its calling thread",
            n=len(inline),
            lower_is_better=True,
            max_us=round(inline[-1] * 1e6, 1),
        )


async def bench_sqlite_read(workdir: Path, sizes: Sizes) -> None:
    progress(f"sqlite read: populating {sizes.sqlite_read_events:,} events on each side")
    ours_path = workdir / "ours-read.db"
    es_path = workdir / "es-read.db"
    store = await open_event_store(f"sqlite://{ours_path}")
    es = EventsourcingSide(es_path, pool_size=2)
    try:
        size = sizes.sqlite_stream_size
        streams = await populate(store, sizes.sqlite_read_events, size, "read")
        stream_ids = [uuid.uuid4() for _ in streams]
        for stream, stream_id in zip(streams, stream_ids, strict=True):
            bodies = [wire_body(stream, i + 1, i)[1] for i in range(size)]
            await asyncio.to_thread(es.append_stream, stream_id, bodies, min(size, 500))
        n = sizes.sqlite_read_events

        async def ours_streams() -> int:
            count = 0
            for stream in streams:
                async for event in store.read(stream):
                    if not isinstance(event.data, StateUpdate):
                        raise AssertionError("read gave an untyped payload")
                    count += 1
            return count

        sides: dict[str, dict[str, Callable[[], Awaitable[int]]]] = {
            "read_all": {
                "ours": lambda: ours_read_all(store, n),
                "eventsourcing": lambda: asyncio.to_thread(es.read_all, n),
            },
            "read_stream": {
                "ours": ours_streams,
                "eventsourcing": lambda: asyncio.to_thread(es.read_streams, stream_ids),
            },
        }
        for label, pair in sides.items():
            for side in pair.values():
                await side()
            best = dict.fromkeys(pair, 0.0)
            for round_no in range(sizes.rounds):
                for key, side in pair.items():
                    count, seconds = await timed(side)
                    if count != n:
                        raise AssertionError(f"{label} {key} read {count} of {n} events")
                    best[key] = max(best[key], count / seconds)
                    progress(f"  {label} round {round_no + 1} {key}: {count / seconds:,.0f} ev/s")
            what = (
                "read_all of the whole log, pages of 1000 for eventsourcing's select_notifications"
                if label == "read_all"
                else f"every stream of {size} events read in full; baseline: select_events"
            )
            emit(
                f"sqlite.{label}",
                best["ours"],
                best["eventsourcing"],
                f"events/s ({what}; typed decode on both sides)",
                n=n,
                lower_is_better=False,
            )
    finally:
        await store.close()
        es.close()


PARTS = ("append", "read")


async def main(
    sizes: Sizes, parts: tuple[str, ...] = PARTS, synchronous: tuple[str, ...] = SYNCHRONOUS
) -> None:
    async with workdir("sqlite") as path:
        progress(f"sqlite files in {path}")
        if "append" in parts:
            for mode in synchronous:
                await bench_sqlite_append(path, sizes, mode)
        if "read" in parts:
            await bench_sqlite_read(path, sizes)


if __name__ == "__main__":
    command = parser(__doc__)
    command.add_argument("--part", choices=PARTS, help="only the append or only the read lines")
    command.add_argument(
        "--synchronous",
        choices=(*SYNCHRONOUS, "both"),
        default="both",
        help="the durability of the append lines, on both sides (default: FULL, then NORMAL)",
    )
    args = command.parse_args()
    modes = SYNCHRONOUS if args.synchronous == "both" else (args.synchronous,)
    run_benchmark(main(sizes_of(args), (args.part,) if args.part else PARTS, modes))
