"""The SQLite event store: one WAL-mode table, group commit on one writer thread, paged reads.

Layout: one table `events` whose `position` (INTEGER PRIMARY KEY) is the global position, with
UNIQUE(stream, version) and UNIQUE(id); the body is the envelope's JSON exactly as the JetStream
backend publishes it, so both backends store the same bytes.

Threads: each connection is a plain `sqlite3` connection opened, used and closed on its own
single-worker thread (a `ThreadPoolExecutor`; sqlite3 checks that no other thread touches it), and
every call to it is one `run_in_executor` hop. A file has a writer thread and a reader thread.
`:memory:` has one connection, the writer's: reads run on the writer thread too, between whole
transactions (each is one call there), so they never see one half done and need no lock.

Writing (group commit): `append` enqueues its prepared events with a future and, unless the writer
thread is already draining the queue, starts a drain there (no task on the event loop in between: a
lone appender pays one hop to the thread and one back). The drain takes what is queued as one group
and one plain function runs the whole transaction: `BEGIN IMMEDIATE`, a lookup of the versions of
the streams involved, the event ids already stored and the head position (one query), the checks of
every append on its own in order (idempotent replay, expected version, ids; pure Python over the
rows), one `executemany` of the rows of those that pass, and one COMMIT (one fsync with
synchronous=FULL), or ROLLBACK if anything fails; one callback on the event loop then resolves each
append's future with its own result or its own error, and the drain goes on with what was queued
meanwhile (the next group). A commit that fsyncs never runs on the event loop. The checks
need no SAVEPOINT: `BEGIN IMMEDIATE` takes the write lock before the lookup, so nothing else can
change what was read, and an append that fails a check contributes no rows. If the transaction
itself fails (I/O, a constraint the checks did not foresee), the group is retried one append per
transaction, so that the failure lands on the append that causes it. Closing fails the appends
still queued (StoreClosedError); the group in flight finishes first.

Inline commits (synchronous NORMAL or OFF, a file, `inline_commits=True`): there a WAL commit
writes the log without fsync, so the drain runs on the event loop instead, on a second write
connection, with no thread hop: a lone append (no other inside `append`) commits at once, within
its call; appends that overlap queue during that loop turn and commit as one group in the next
(at most 16 events and 64 KiB of payload per transaction; the rest in the turns after). That
connection has no busy timeout: a write lock held by another process or store fails its `BEGIN
IMMEDIATE` at once, and the group goes to the writer thread, which waits `busy_timeout` for the
lock as before (any other failure too: the thread maps it and retries alone). It does not
checkpoint either (a checkpoint fsyncs): after about SQLite's own threshold of WAL pages, the
next group goes to the writer thread, which checkpoints after its commit. So the loop blocks for
one small transaction without fsync or lock wait: measured p50 / p99 in
benchmarks/sqlite_store.py (`sqlite.append.inline_commit.*`). FULL and EXTRA never commit inline.

Within one process: any number of appenders and store instances; in-process subscribers are woken
on commit (instances on the same file in the same process wake each other too).

Across processes (each with its own SQLiteEventStore on the same file): versions and positions
stay consistent and unique, because every writer takes the database's write lock with `BEGIN
IMMEDIATE` before reading the stream versions and the head, and UNIQUE(stream, version) / UNIQUE(id)
back that up; a writer that finds the lock taken waits up to `busy_timeout`, then its appends fail
with the retryable StoreUnavailableError. Readers never block writers (WAL). A commit is visible to
other processes at once, but their live subscribers see it only at their next poll
(`poll_interval`). Positions are assigned under the write lock and committed in order, so a reader
never sees position N+1 before N: "no gaps" holds across processes too. Not across machines:
SQLite's locking needs a local file system (no NFS).

Reading: the read connection (WAL lets it run beside the writer) fetches a page of `page_size` rows
(position, body, stream and version) per hop with a keyset query, so a replay of millions of events
holds one page of rows in memory at a time. Rows are decoded one by one as the caller takes them,
not a page ahead: an event the caller drops then dies young, which spares the garbage collector
(measured: about a fifth of the per-event cost of `read_all`). The common case (a valid envelope in
its row's place whose payload decodes) is decoded inline in one plain generator per page; anything
else goes through the shared `decode`, which reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Self, TypeVar
from urllib.parse import quote

import msgspec

from newfuse.errors import (
    ConfigError,
    CorruptStoreFileError,
    DuplicateEventError,
    ForeignStoreFileError,
    FuseError,
    ReadOnlyStoreError,
    SQLiteStoreError,
    StoreClosedError,
    StoreFileError,
    StoreNotFoundError,
    StoreUnavailableError,
)
from newfuse.eventstore.base import (
    MAX_BATCH,
    AppendResult,
    EventFilter,
    EventStore,
    Expected,
    InvalidEventHandler,
    PreparedEvent,
    StoredRecord,
    check_expected,
    wrong_expected,
)
from newfuse.schemas import RecordedEvent, SchemaRegistry, as_utc
from newfuse.schemas.body import checked_names
from newfuse.schemas.envelope import ENVELOPE_DECODER

MEMORY: Final[str] = ":memory:"
"""The path of a store that lives in memory and disappears on close."""

SYNCHRONOUS_MODES: Final[tuple[str, ...]] = ("OFF", "NORMAL", "FULL", "EXTRA")

_SCHEMA: Final[tuple[str, ...]] = (
    """
    CREATE TABLE IF NOT EXISTS events (
        position INTEGER PRIMARY KEY,
        stream TEXT NOT NULL,
        category TEXT NOT NULL,
        version INTEGER NOT NULL,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,
        correlation_id TEXT,
        body BLOB NOT NULL,
        UNIQUE (stream, version)
    )
    """,
    "CREATE INDEX IF NOT EXISTS events_by_time ON events (timestamp)",
    # Schema version 1 also indexed category, type and correlation_id. Every commit paid for
    # those three, while the store's filtered reads scan a bounded window of positions anyway
    # (see `_scan`) and ad-hoc questions go to the audit index; version 2 drops them.
    "DROP INDEX IF EXISTS events_by_category",
    "DROP INDEX IF EXISTS events_by_type",
    "DROP INDEX IF EXISTS events_by_correlation",
)
"""`timestamp` is when the event was stored (under the write lock, so it rises with position), in
microseconds since the Unix epoch (UTC): an integer sorts and compares exactly. Opening a file of
an older schema version brings it up to this one in the same transaction."""

_SCHEMA_VERSION: Final[int] = 2
_COLUMNS: Final[frozenset[str]] = frozenset(
    {
        "position",
        "stream",
        "category",
        "version",
        "id",
        "type",
        "schema_version",
        "timestamp",
        "correlation_id",
        "body",
    }
)
"""The columns of `events` in the schema above: a file whose `events` has others is not ours."""

_PASSING: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_PROTOCOL,
    }
)
"""Primary SQLite result codes of failures that waiting can cure (retryable)."""

_ADVICE: Final = {
    sqlite3.SQLITE_CANTOPEN: "check that the directory exists and that this process may "
    "create and write files in it",
    sqlite3.SQLITE_PERM: "this process may not use the file: check its permissions",
    sqlite3.SQLITE_TOOBIG: "an event is larger than SQLite's length limit: make it smaller",
}
"""What to do about a failure that the same call would meet again, by primary result code."""


def _error_name(error: sqlite3.Error) -> str:
    return getattr(error, "sqlite_errorname", None) or type(error).__name__


_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26
"""SQLite result codes (https://sqlite.org/rescode.html) of a damaged file, or not a database."""

_STREAM_VERSION: Final[str] = "version"
_STORED_ID: Final[str] = "stored id"
_HEAD: Final[str] = "head"

# One query under the write lock: each stream's version, the ids already stored, the head; the
# first column of each row says which of the three it is.
_LOOKUP: Final[str] = f"""
    SELECT '{_STREAM_VERSION}', s.value, NULL,
        (SELECT max(version) FROM events WHERE stream = s.value), NULL
    FROM json_each(?1) AS s
    UNION ALL
    SELECT '{_STORED_ID}', e.id, e.stream, e.version, e.position
    FROM events AS e WHERE e.id IN (SELECT value FROM json_each(?2))
    UNION ALL
    SELECT '{_HEAD}', NULL, NULL, NULL, max(position) FROM events
"""

_NO_FSYNC_AT_COMMIT: Final[frozenset[str]] = frozenset({"OFF", "NORMAL"})
"""Modes whose WAL commit writes without fsync (NORMAL fsyncs at checkpoints only)."""

_INLINE_MAX_EVENTS: Final[int] = 16
_INLINE_MAX_BYTES: Final[int] = 64 * 1024
"""The most an inline transaction, on the loop, commits (events, payload bytes, in one append or
a group of them): what bounds how long an inline commit can block it."""

_INLINE_PAGES: Final[int] = 4
_CHECKPOINT_PAGES: Final[int] = 1000
"""WAL pages an inline commit writes besides its payloads (the table's and three indexes' leaves,
measured: about 4.3 for one event), and how many make the writer thread checkpoint: SQLite's own
automatic checkpoint default, which the inline connection turns off."""

_LOOKUP_ONE: Final[str] = f"""
    SELECT '{_STREAM_VERSION}', ?1, NULL, (SELECT max(version) FROM events WHERE stream = ?1), NULL
    UNION ALL
    SELECT '{_STORED_ID}', e.id, e.stream, e.version, e.position FROM events AS e WHERE e.id = ?2
    UNION ALL
    SELECT '{_HEAD}', NULL, NULL, NULL, max(position) FROM events
"""
"""`_LOOKUP` for one event in one stream (a lone appender's group), without JSON arrays."""

_INSERT: Final[str] = (
    "INSERT INTO events (position, stream, category, version, id, type, schema_version, "
    "timestamp, correlation_id, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_EPOCH: Final[datetime] = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final[timedelta] = timedelta(microseconds=1)
_JSON: Final[msgspec.json.Encoder] = msgspec.json.Encoder()

_Row = tuple[int, str, str, int, str, str, int, int, str | None, bytes]
_T = TypeVar("_T")

# Stores by file, so that an in-process commit wakes the subscribers of every instance on the file.
_neighbours: weakref.WeakValueDictionary[int, SQLiteEventStore] = weakref.WeakValueDictionary()


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    return (as_utc(moment) - _EPOCH) // _MICROSECOND


@dataclass(slots=True)
class _Append:
    """One append waiting for the writer: what to write, and the future its caller awaits."""

    stream: str
    events: list[PreparedEvent]
    expected: Expected
    future: asyncio.Future[AppendResult]


class SQLiteEventStore(EventStore):
    """The event store in one SQLite file (or in memory), each connection on its own thread.

    Open it with `await SQLiteEventStore.open(path)` or `open_event_store("sqlite:///path")`, and
    close it (or use `async with`). See the module docstring for what holds across processes.
    """

    backend = "sqlite"

    # Every row is written by a SQLiteEventStore, which bounds nesting on append; a file that
    # someone else wrote into is corrupt anyway, and the decoder's own guard (RecursionError,
    # reported like any invalid event) still keeps a deep row from stopping a reader. Skipping
    # the pre-check keeps about a fifth of read_all's time per event.
    bounded_reads = False

    def __init__(
        self,
        path: str,
        *,
        registry: SchemaRegistry | None = None,
        on_invalid: InvalidEventHandler | None = None,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        poll_interval: float = 0.05,
        page_size: int = 500,
        max_group_events: int = 4 * MAX_BATCH,
        inline_commits: bool = True,
    ) -> None:
        super().__init__(registry=registry, on_invalid=on_invalid)
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ConfigError(
                variable="synchronous",
                value=synchronous,
                reason=f"use one of {', '.join(SYNCHRONOUS_MODES)} (FULL: an fsync per commit)",
            )
        for variable, value in (("busy_timeout", busy_timeout), ("poll_interval", poll_interval)):
            if value <= 0:
                raise ConfigError(
                    variable=variable, value=value, reason="must be a positive number of seconds"
                )
        for variable, count in (("page_size", page_size), ("max_group_events", max_group_events)):
            if count < 1:
                raise ConfigError(variable=variable, value=count, reason="must be at least 1")
        self.path = path
        self.synchronous = mode
        self.busy_timeout = busy_timeout
        self.poll_interval = poll_interval
        self.page_size = page_size
        self.max_group_events = max_group_events
        self._memory = path == MEMORY
        # A lone small append commits on the event loop only where its COMMIT has no fsync (WAL
        # with NORMAL or OFF) and a second connection can be had (not in memory).
        self.inline_commits = inline_commits and mode in _NO_FSYNC_AT_COMMIT and not self._memory
        # A filtered scan looks at this many positions per query at most, so that no query sorts
        # or scans more than a bounded slice of the log, whatever the filter.
        self._window = page_size * 20
        self._where = f"in SQLite event store {path}"  # decode reports the position itself
        # Each connection is opened, used and closed on its own single-worker thread only (the
        # sqlite3 module checks it). `:memory:` has one connection: reads run on the writer's
        # thread, between whole transactions, so they never see one half done.
        self._write_thread: ThreadPoolExecutor | None = None
        self._read_thread: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # The loop's own write connection (inline commits): no busy wait, no auto-checkpoint; used
        # only on the loop, only while it holds `_draining`, so never beside the writer thread.
        self._inline: sqlite3.Connection | None = None
        self._appending = 0  # appends inside `_append` now: more than one means they overlap
        self._wal_pages = 0  # pages the inline commits wrote to the WAL since their checkpoint
        self._checkpoint_due = False  # then the next append goes to the writer thread
        # Appends waiting for the writer thread; the lock makes "queue it, and start a drain
        # unless one is running" one step against the drain's "nothing left, stop".
        self._queue: deque[_Append] = deque()
        self._queue_lock = threading.Lock()
        self._draining = False
        self._in_flight: list[_Append] = []
        self._stopping = False
        self._committed = asyncio.Event()
        self._file_key = None if self._memory else str(Path(path).resolve())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_only = ""  # why the file opened read-only, if it did

    # -- lifecycle --------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        registry: SchemaRegistry | None = None,
        on_invalid: InvalidEventHandler | None = None,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        poll_interval: float = 0.05,
        page_size: int = 500,
        max_group_events: int = 4 * MAX_BATCH,
        inline_commits: bool = True,
        create: bool = True,
    ) -> Self:
        """Open (creating if needed) the store at `path`, or a fresh one in memory (`:memory:`).

        Args:
            path: a file path, or `:memory:`.
            registry: payload types; the default registry when None.
            on_invalid: called with each stored row that is not a valid event (default: a log
                warning); the row is skipped.
            synchronous: SQLite's `synchronous` pragma. FULL (default) fsyncs every commit;
                NORMAL in WAL mode may lose the last commits on power loss, never consistency.
            busy_timeout: seconds a writer waits for another process's write lock.
            poll_interval: seconds between checks for events written by other processes.
            page_size: rows fetched per query when reading.
            max_group_events: most events the writer commits in one transaction.
            inline_commits: with synchronous NORMAL or OFF (a WAL commit without fsync), commit
                a lone small append on the event loop instead of the writer thread (see the
                module docstring); False: always on the writer thread. No effect with FULL or
                EXTRA, whose commits fsync, nor in memory.
            create: create the file when it is missing; False (for readers) raises instead.

        Raises:
            ConfigError: an option has an unusable value.
            StoreUnavailableError: the file cannot be opened or its schema created.
            StoreNotFoundError: `create=False` and there is no file at `path`.
        """
        if not create and path != ":memory:":
            await asyncio.to_thread(_require_file, path)
        store = cls(
            path,
            registry=registry,
            on_invalid=on_invalid,
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            poll_interval=poll_interval,
            page_size=page_size,
            max_group_events=max_group_events,
            inline_commits=inline_commits,
        )
        try:
            await store._start()
        except BaseException:
            await store.close()
            raise
        return store

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        operation = f"open SQLite event store {self.path!r}"
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="newfuse-sqlite-writer")
        try:
            self._writer = await self._on(self._write_thread, self._open_writer)
        except sqlite3.Error as error:
            if not self._cannot_write(error):
                raise self._store_error(operation, error) from error
            self._read_only = f"{error} ({_error_name(error)})"
        try:
            if not self._memory:
                self._read_thread = ThreadPoolExecutor(
                    1, thread_name_prefix="newfuse-sqlite-reader"
                )
                self._reader = await self._on(self._read_thread, self._open_reader)
        except sqlite3.Error as error:
            raise self._store_error(operation, error) from error
        if self._read_only:
            return  # no writer: appends are refused, reads and subscriptions poll the file
        if not self._memory:
            _neighbours[id(self)] = self
        if self.inline_commits:
            try:
                self._inline = await self._on(self._write_thread, self._open_inline)
            except sqlite3.Error as error:
                raise self._store_error(operation, error) from error

    async def _on(self, thread: ThreadPoolExecutor, call: Callable[..., _T], *args: Any) -> _T:
        """Run `call(*args)` on `thread` (one hop) and return its result."""
        loop = self._loop
        if loop is None:
            raise StoreClosedError(store=f"SQLiteEventStore({self.path!r})")
        return await loop.run_in_executor(thread, call, *args)

    def _connect(self) -> sqlite3.Connection:
        """A connection in autocommit mode (transactions are explicit), on the calling thread."""
        return sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout)

    def _open_writer(self) -> sqlite3.Connection:
        """On the writer thread: the write connection, with WAL, `synchronous` and the schema."""
        connection = self._connect()
        try:
            self._check_ours(connection)  # before WAL mode, which would change a foreign file
            if not self._memory:
                connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={self.synchronous}")
            connection.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                connection.execute("COMMIT")
            except BaseException:
                _rollback(connection)
                raise
        except BaseException:
            connection.close()
            raise
        return connection

    def _open_inline(self) -> sqlite3.Connection:
        """On the writer thread, for the loop: the inline commits' connection.

        No busy timeout (a write lock held elsewhere fails at once, and the append goes to the
        writer thread, which waits for it) and no automatic checkpoint (a checkpoint fsyncs: the
        writer thread runs them, see `_inline_commit`).
        """
        connection = sqlite3.connect(
            self.path, isolation_level=None, timeout=0.0, check_same_thread=False
        )
        try:
            connection.execute(f"PRAGMA synchronous={self.synchronous}")
            connection.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            connection.close()
            raise
        return connection

    def _check_ours(self, connection: sqlite3.Connection) -> None:
        """Refuse a database that newfuse did not create: one with tables but no `events` table
        of our columns, or of a newer schema version. An empty database is ours to set up.

        Raises:
            ForeignStoreFileError: it is another application's database (nothing is changed).
            sqlite3.DatabaseError: the file is not a database (mapped by `_store_error`).
        """
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                "ORDER BY name"
            )
        ]
        if not tables:
            return
        if "events" not in tables:
            listed = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise ForeignStoreFileError(path=self.path, found=f"its tables are {listed}")
        columns = {row[1] for row in connection.execute("PRAGMA table_info(events)")}
        if columns != _COLUMNS:
            raise ForeignStoreFileError(
                path=self.path,
                found=f"its events table has the columns {', '.join(sorted(columns))}",
            )
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > _SCHEMA_VERSION:
            raise ForeignStoreFileError(
                path=self.path,
                found=f"its schema version is {version}, this newfuse knows {_SCHEMA_VERSION}: "
                f"a newer newfuse wrote it; upgrade newfuse to open it",
            )

    def _open_reader(self) -> sqlite3.Connection:
        """On the reader thread: a read-only connection (WAL lets it read beside the writer).

        On a file that cannot be written, `mode=ro`; if SQLite cannot even make the WAL's shared
        memory file beside it (a read-only directory), `immutable=1`: then nobody can change the
        file, so reading it without locks is safe.
        """
        modes = ("mode=ro", "immutable=1") if self._read_only else ("",)
        for mode in modes:
            if mode:
                target = quote(str(Path(self.path).resolve()))
                connection = sqlite3.connect(
                    f"file:{target}?{mode}",
                    uri=True,
                    isolation_level=None,
                    timeout=self.busy_timeout,
                )
            else:
                connection = self._connect()
            try:
                connection.execute("PRAGMA query_only=ON")
                if mode:
                    self._check_ours(connection)  # the writer that would have checked is gone
            except sqlite3.OperationalError as error:
                connection.close()
                if mode == "mode=ro" and error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_CANTOPEN:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            return connection
        raise AssertionError("unreachable: the last mode returns or raises")  # pragma: no cover

    def _cannot_write(self, error: sqlite3.Error) -> bool:
        """True if opening the writer failed only because the file cannot be written."""
        if self._memory or not Path(self.path).is_file():
            return False
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        return code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM)

    @property
    def read_only(self) -> bool:
        """True if the file could not be opened for writing: appends raise ReadOnlyStoreError."""
        return bool(self._read_only)

    async def _close(self) -> None:
        self._stopping = True
        _neighbours.pop(id(self), None)
        closed = StoreClosedError(store=f"SQLiteEventStore({self.path!r})")
        with self._queue_lock:
            queued, self._queue = list(self._queue), deque()
        for waiting in queued:  # never started: fail them, nothing of theirs was written
            if not waiting.future.done():
                waiting.future.set_exception(closed)
        if self._write_thread is not None and self._loop is not None:
            # The group in flight (if any) finishes, so its callers learn the real outcome (its
            # settling reaches the loop before this no-op's end does). Stop waiting only if the
            # commit hangs past the busy timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.busy_timeout + 5.0):
                    await self._on(self._write_thread, _nothing)
        for waiting in self._in_flight:  # only after a hung commit: outcome unknown
            if not waiting.future.done():
                waiting.future.set_exception(closed)
        self._committed.set()  # wake subscribers so that they see the store is closed
        # Each connection is closed on its own thread, after what that thread still has to do.
        if self._inline is not None and self._write_thread is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._on(self._write_thread, self._inline.close)
        for thread, connection in (
            (self._read_thread, self._reader),
            (self._write_thread, self._writer),
        ):
            if thread is None:
                continue
            if connection is not None:
                with contextlib.suppress(sqlite3.Error):
                    await self._on(thread, connection.close)
            thread.shutdown(wait=True)  # idle by now: the worker exits at once
        self._reader = self._writer = self._inline = None
        self._read_thread = self._write_thread = None

    # -- writing ----------------------------------------------------------------------------------

    async def _append(
        self, stream: str, events: list[PreparedEvent], expected: Expected
    ) -> AppendResult:
        if self._read_only:
            raise ReadOnlyStoreError(
                store=f"SQLite event store {self.path!r}", reason=self._read_only
            )
        thread, loop = self._write_thread, self._loop
        if self._stopping or thread is None or loop is None:
            raise StoreClosedError(store=f"SQLiteEventStore({self.path!r})")
        future: asyncio.Future[AppendResult] = loop.create_future()
        self._appending += 1
        try:
            with self._queue_lock:
                self._queue.append(_Append(stream, events, expected, future))
                start, self._draining = not self._draining, True
            if not start:
                return await future  # the drain under way (thread or loop) takes it
            if self._inline is None or self._checkpoint_due:
                # Straight to the writer thread (no writer task on the loop in between): a lone
                # appender pays one hop there and one back, appenders that overlap share a
                # commit.
                thread.submit(self._drain)
            elif self._appending == 1:  # alone: commit it now, on the loop
                self._drain_on_loop()
                if future.done():
                    await asyncio.sleep(0)  # let the loop run others before this caller
                    return future.result()
            else:  # others are inside append now: what they queue this turn commits as one
                loop.call_soon(self._drain_on_loop)
            return await future
        finally:
            self._appending -= 1

    def _drain_on_loop(self) -> None:
        """On the loop, holding `_draining` (so the writer thread is idle): commit what is queued
        (up to `_INLINE_MAX_EVENTS` events, `_INLINE_MAX_BYTES`) in one transaction on the inline
        connection and settle it; then the next group, in the next loop turn.

        The loop blocks for that transaction only: a write lock that is free at once, one lookup,
        at most `_INLINE_MAX_EVENTS` rows, a COMMIT that writes the WAL without fsync. What it
        cannot do so goes to the writer thread, nothing written: a larger append, a checkpoint
        due (checkpoints fsync), and any failure, a write lock held elsewhere included (there it
        waits up to `busy_timeout`, and errors are mapped and retried alone as in any group).
        """
        with self._queue_lock:
            group = self._take_group(_INLINE_MAX_EVENTS)
            if not group:
                self._draining = False
                return
        connection, thread = self._inline, self._write_thread
        outcomes: list[AppendResult | Exception] | None = None
        if connection is not None and not self._stopping and _small(group):
            try:
                outcomes = self._transact(group, connection)
            except Exception:  # rolled back: the writer thread does it again
                outcomes = None
        if outcomes is None:
            with self._queue_lock:
                self._queue.extendleft(reversed(group))
            if thread is not None:
                thread.submit(self._drain)
            return
        self._wal_pages += sum(
            _INLINE_PAGES + sum(len(event.data) for event in waiting.events) // 4096
            for waiting in group
        )
        self._checkpoint_due = self._wal_pages >= _CHECKPOINT_PAGES
        with self._queue_lock:
            more = bool(self._queue)
            self._draining = more
        self._settle(group, outcomes)
        if not more:
            return
        if self._checkpoint_due and thread is not None:
            thread.submit(self._drain)
        elif self._loop is not None:
            self._loop.call_soon(self._drain_on_loop)

    def _checkpoint(self) -> None:
        """On the writer thread, holding `_draining`: copy the WAL into the database, as SQLite's
        automatic checkpoint would have after the inline commits. No inline commit runs beside it,
        so it completes and the next commit starts the WAL over (a checkpoint racing a stream of
        commits never catches up, and the WAL would grow without bound)."""
        self._wal_pages, self._checkpoint_due = 0, False
        if self._writer is not None:
            with contextlib.suppress(sqlite3.Error):  # PASSIVE: it never waits; the next tries
                self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _drain(self) -> None:
        """On the writer thread: commit one group of what is queued and hand the outcomes to the
        loop; while more is queued, come back behind whatever else waits for this thread (in
        memory, the reads), so that appends never starve them."""
        with self._queue_lock:
            group = self._take_group(self.max_group_events)
            if not group:
                self._draining = False
                return
        self._in_flight = group
        outcomes = self._commit(group)
        if self._checkpoint_due:
            self._checkpoint()
        # Let go before the outcomes reach the loop, so that their callers' next appends find
        # the writer idle (and may commit inline) instead of queueing behind this drain.
        with self._queue_lock:
            self._draining = more = bool(self._queue)
        loop = self._loop
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            if loop is not None:
                loop.call_soon_threadsafe(self._settle, group, outcomes)
        if not more:
            return
        thread = self._write_thread
        try:
            if thread is None:
                raise RuntimeError("the writer thread is gone")
            thread.submit(self._drain)
        except RuntimeError:  # shut down: close() fails what is still queued
            with self._queue_lock:
                self._draining = False

    def _take_group(self, max_events: int) -> list[_Append]:
        """Appends from the queue, oldest first, up to `max_events` events (at least one)."""
        group: list[_Append] = []
        size = 0
        while self._queue:
            waiting = self._queue[0]
            if waiting.future.done():  # its caller was cancelled before it was written
                self._queue.popleft()
                continue
            if group and size + len(waiting.events) > max_events:
                break
            group.append(self._queue.popleft())
            size += len(waiting.events)
        return group

    def _commit(self, group: list[_Append]) -> list[AppendResult | Exception]:
        """On the writer thread: the group in one transaction; each append's outcome (never
        raises: the writer must outlive any failure, or appends would hang)."""
        try:
            return self._transact(group, self._writer)
        except Exception as error:
            # A busy lock, I/O error or full disk (OperationalError) would fail each append alike;
            # anything else may come from one append: retry them alone so that only it fails.
            retry_alone = not isinstance(error, sqlite3.OperationalError) and not self._stopping
            if len(group) > 1 and retry_alone:
                return [
                    error if waiting.future.done() else self._commit([waiting])[0]
                    for waiting in group
                ]
            return [self._store_error(f"append to {waiting.stream!r}", error) for waiting in group]

    def _settle(self, group: list[_Append], outcomes: list[AppendResult | Exception]) -> None:
        """On the loop: resolve each append's future with its own outcome."""
        if self._in_flight is group:
            self._in_flight = []
        wrote = False
        for waiting, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, AppendResult):
                wrote = True  # also for a caller cancelled meanwhile: subscribers get the event
                if not waiting.future.done():
                    waiting.future.set_result(outcome)
            elif not waiting.future.done():
                waiting.future.set_exception(outcome)
        if wrote:
            self._notify_commit()

    def _transact(
        self, group: list[_Append], connection: sqlite3.Connection | None
    ) -> list[AppendResult | Exception]:
        """On the writer thread (or inline, on the loop): lock, look up, check, insert, commit;
        each append's outcome."""
        if connection is None:
            raise ValueError("the write connection is closed")
        streams = list(dict.fromkeys(waiting.stream for waiting in group))
        ids = [event.id for waiting in group for event in waiting.events]
        lookup, parameters = _LOOKUP_ONE, (streams[0], ids[0])
        if len(ids) > 1:
            lookup = _LOOKUP
            parameters = (_JSON.encode(streams).decode(), _JSON.encode(ids).decode())
        connection.execute("BEGIN IMMEDIATE")
        try:
            found = connection.execute(lookup, parameters).fetchall()
            rows, outcomes = self._plan(group, found)
            if rows:
                connection.executemany(_INSERT, rows)
            connection.execute("COMMIT")
        except BaseException:
            _rollback(connection)
            raise
        return outcomes

    def _plan(
        self, group: list[_Append], found: Iterable[Any]
    ) -> tuple[list[_Row], list[AppendResult | Exception]]:
        """Check each append against the stored state (and the group's earlier appends)."""
        # The time window of read_all is store time, as in JetStream: stamped here, under the
        # write lock, so it rises with position (the envelope keeps the writer's own time).
        stored_at = time.time_ns() // 1_000
        versions: dict[str, int] = {}
        stored: dict[str, tuple[str, int, int]] = {}
        head = 0
        for kind, key, stream, version, position in found:
            if kind == _STREAM_VERSION:
                versions[key] = version or 0
            elif kind == _STORED_ID:
                stored[key] = (stream, version, position)
            else:
                head = position or 0
        rows: list[_Row] = []
        outcomes: list[AppendResult | Exception] = []
        for waiting in group:
            stream, events = waiting.stream, waiting.events
            ids = [event.id for event in events]
            known = [stored.get(event_id) for event_id in ids]
            if any(known):
                outcomes.append(_replayed(stream, ids, known))
                continue
            actual = versions.get(stream, 0)
            if not check_expected(waiting.expected, actual):
                outcomes.append(wrong_expected(stream, waiting.expected, actual))
                continue
            category = stream.partition(".")[0]
            for offset, event in enumerate(events, start=1):
                version, position = actual + offset, head + offset
                rows.append(
                    (
                        position,
                        stream,
                        category,
                        version,
                        event.id,
                        event.type,
                        event.schema_version,
                        stored_at,
                        event.correlation_id,
                        event.encode(stream, version),
                    )
                )
                stored[event.id] = (stream, version, position)
            outcomes.append(AppendResult.of(stream, ids, actual + 1, head + 1))
            versions[stream] = actual + len(events)
            head += len(events)
        return rows, outcomes

    def _store_error(self, operation: str, error: Exception) -> Exception:
        """The one place where an `sqlite3` error becomes a FuseError (every one of them does);
        an exception that is not SQLite's (a bug) is returned as it is."""
        # ValueError: our own "connection closed"; ProgrammingError: sqlite3's.
        if isinstance(error, ValueError | sqlite3.ProgrammingError) or self._stopping:
            return StoreClosedError(store=f"SQLiteEventStore({self.path!r})")
        if not isinstance(error, sqlite3.Error):
            return error
        mapped: FuseError
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            mapped = CorruptStoreFileError(path=self.path, reason=str(error))
        elif code in _PASSING or (not code and isinstance(error, sqlite3.OperationalError)):
            # another process's lock, I/O trouble, a full disk (or no code told): may pass
            mapped = StoreUnavailableError(operation=operation, reason=str(error))
        elif code == sqlite3.SQLITE_READONLY:  # made read-only after it was opened
            mapped = ReadOnlyStoreError(
                store=f"SQLite event store {self.path!r}", reason=f"{error} ({_error_name(error)})"
            )
        elif code in _ADVICE:  # the place or the size, not the moment, is wrong
            mapped = StoreFileError(
                path=self.path,
                operation=operation,
                reason=f"{error} ({_error_name(error)})",
                advice=_ADVICE[code],
            )
        else:
            mapped = SQLiteStoreError(
                operation=operation, path=self.path, reason=f"{type(error).__name__}: {error}"
            )
        mapped.__cause__ = error  # also when it fails a future rather than being raised
        return mapped

    def _notify_commit(self) -> None:
        self._wake()
        if self._file_key is None or len(_neighbours) < 2:  # no other store in this process
            return
        for other in list(_neighbours.values()):
            if (
                other is not self
                and other._file_key == self._file_key
                and other._loop is self._loop
            ):
                other._wake()

    def _wake(self) -> None:
        # Waiters hold the event they saw before reading; a fresh one catches the next commit.
        committed, self._committed = self._committed, asyncio.Event()
        committed.set()

    # -- reading ----------------------------------------------------------------------------------

    async def _fetch(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        """The rows of one query, in one hop to the reader thread (the writer's, in memory)."""
        self._check_open()
        if self._memory:
            thread, connection = self._write_thread, self._writer
        else:
            thread, connection = self._read_thread, self._reader
        if thread is None or connection is None:
            raise StoreClosedError(store=f"SQLiteEventStore({self.path!r})")
        try:
            return await self._on(thread, _fetch_all, connection, sql, parameters)
        except (sqlite3.Error, ValueError) as error:
            raise self._store_error(f"read from SQLite event store {self.path!r}", error) from error

    async def _scalar(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        rows = await self._fetch(sql, parameters)
        return int(rows[0][0] or 0) if rows else 0

    async def _pages(
        self,
        sql: str,
        parameters: tuple[Any, ...] | None,
        following: Callable[[list[Any], tuple[Any, ...]], tuple[Any, ...] | None],
    ) -> AsyncIterator[list[Any]]:
        """Pages of rows of `sql`, from `parameters` (None: no page at all); `following(rows,
        parameters)` gives the next page's parameters once the caller is done with a page (None:
        that was the last page).

        (Prefetching the next page while the caller decodes this one was measured: no gain, the
        GIL serialises row building and decoding.)
        """
        while parameters is not None:
            rows = await self._fetch(sql, parameters)
            yield rows
            parameters = following(rows, parameters)

    async def _read(
        self, stream: str, from_version: int | None, limit: int | None, backwards: bool
    ) -> AsyncIterator[RecordedEvent]:
        if backwards:
            # from_version is the highest version wanted; None means "from the last".
            bound = (1 << 62) if from_version is None else from_version
            sql = (
                "SELECT position, body, stream, version FROM events "
                "WHERE stream = ? AND version <= ? ORDER BY version DESC LIMIT ?"
            )
        else:
            bound = max(from_version or 1, 1)
            sql = (
                "SELECT position, body, stream, version FROM events "
                "WHERE stream = ? AND version >= ? ORDER BY version LIMIT ?"
            )
        remaining = limit
        while True:
            wanted = self.page_size if remaining is None else min(self.page_size, remaining)
            if wanted <= 0:
                return
            # One row more than the page: if it comes, there is a next page (it starts there);
            # if not, this was the last, and no query for an empty page follows (a stream of
            # page_size events is one hop, not two).
            rows = await self._fetch(sql, (stream, bound, wanted + 1))
            more = len(rows) > wanted
            for event in self._decoded(rows[:wanted] if more else rows):
                yield event
                if remaining is not None:
                    remaining -= 1
            if not more:
                return
            bound = rows[wanted][3]

    async def _read_all(
        self,
        from_position: int,
        since: datetime | None,
        until: datetime | None,
        filter: EventFilter,
        limit: int | None,
    ) -> AsyncIterator[RecordedEvent]:
        clauses, parameters = _filter_sql(filter)
        bounds = ["(SELECT max(position) FROM events)"]
        bound_parameters: list[Any] = []
        if since is not None:
            clauses.append("+timestamp >= ?")  # '+': scan by position, not by the time index
            parameters.append(_micros(since))
            bounds.append("(SELECT min(position) FROM events WHERE timestamp >= ?)")
            bound_parameters.append(_micros(since))
        if until is not None:
            clauses.append("+timestamp <= ?")
            parameters.append(_micros(until))
            bounds.append("(SELECT max(position) FROM events WHERE timestamp <= ?)")
            bound_parameters.append(_micros(until))
        # The head as it is now (reading stops there), narrowed by the time index when asked.
        [found] = await self._fetch(f"SELECT {', '.join(bounds)}", bound_parameters)
        head = found[0] or 0
        start = from_position
        if since is not None:
            if found[1] is None:
                return
            start = max(start, found[1])
        if until is not None:
            head = min(head, found[-1] or 0)
        remaining = limit

        def left() -> int | None:  # read when the next page is asked for
            return remaining

        async for rows in self._scan(start - 1, head, clauses, parameters, left):
            for event in self._decoded(rows):
                yield event
                if remaining is not None:
                    remaining -= 1

    async def _records(self, from_position: int) -> AsyncIterator[StoredRecord]:
        head = await self._scalar("SELECT coalesce(max(position), 0) FROM events")
        async for rows in self._scan(from_position - 1, head, [], [], lambda: None):
            for position, body, stream, _ in rows:
                yield StoredRecord(position, str(stream), _as_bytes(body))

    def _decoded(self, rows: list[Any]) -> Iterator[RecordedEvent]:
        """The valid events of a page of (position, body, stream, version) rows, decoded one by
        one as they are taken.

        A plain generator (not an async one per event). The common case runs inline: an envelope
        in its row's place (stream and version), whose stream and type names `parse_envelope`
        has checked before, whose payload decodes (straight into the newest struct when it is of
        that version, as `registry.decode` would; a payload with sealed fields is opened by
        `_payload`, as `decode` would, without parsing the envelope again). Anything else goes
        through `decode`, which checks it in full and reports why it is skipped. No depth
        pre-check (`bounded_reads` is False: our writer bounded every row).
        """
        where, registry = self._where, self.registry
        streams, types = checked_names()
        envelope_of = ENVELOPE_DECODER.decode
        last_type, last_version = "", 0
        payload: msgspec.json.Decoder[Any] | None = None
        sealed = False
        for position, body, stream, version in rows:
            event: RecordedEvent | None = None
            reported = False
            try:
                envelope = envelope_of(body)
                type_name, schema_version = envelope.type, envelope.schema_version
                if type_name != last_type or schema_version != last_version:
                    last_type, last_version = type_name, schema_version
                    payload = registry.newest_decoder(type_name, schema_version)
                    sealed = registry.sealed(type_name, schema_version) is not None
                in_place = (
                    envelope.stream == stream
                    and envelope.version == version
                    and stream in streams
                    and type_name in types
                )
                if in_place and sealed:  # its fields opened from the envelope checked here
                    event, reported = self._payload(position, where, envelope), True
                elif in_place:
                    data = (
                        registry.decode(type_name, schema_version, envelope.data)
                        if payload is None  # an older version (upcast) or unregistered type
                        else payload.decode(envelope.data)
                    )
                    event = RecordedEvent(position=position, envelope=envelope, data=data)
            except Exception:  # decode below finds it again, says what is wrong, and reports it
                event = None
            if event is None and not reported:  # (a sealed one _payload found invalid it told)
                event = self.decode(body, position, where, stream, version=version)
            if event is not None:
                yield event

    def _scan(
        self,
        after: int,
        upto: int,
        clauses: list[str],
        parameters: list[Any],
        left: Callable[[], int | None],
    ) -> AsyncIterator[list[Any]]:
        """Pages of (position, body, stream, version) rows at positions in (after, upto] that match
        `clauses`, in order; `left()` is how many more events the caller wants when it asks for the
        next page (None: all). The caller decodes each row as it yields it: a decoded event then
        dies young, which costs the garbage collector far less than a page of them kept alive.

        A filtered query looks at a window of `_window` positions at most, so that no query
        scans or sorts more than a bounded slice of the log, whatever indexes the filter can use.
        """
        where = " AND ".join(["position > ?", "position <= ?", *clauses])
        sql = (
            f"SELECT position, body, stream, version FROM events WHERE {where} "
            "ORDER BY position LIMIT ?"
        )

        def query(low: int) -> tuple[Any, ...] | None:
            remaining = left()
            wanted = self.page_size if remaining is None else min(self.page_size, remaining)
            if low >= upto or wanted <= 0:
                return None
            high = min(upto, low + self._window) if clauses else upto
            return (low, high, *parameters, wanted)

        def following(rows: list[Any], asked: tuple[Any, ...]) -> tuple[Any, ...] | None:
            # A full page may have more after its last row; a short one finished its window.
            return query(rows[-1][0] if len(rows) == asked[-1] else asked[1])

        return self._pages(sql, query(after), following)

    async def _subscribe(
        self, filter: EventFilter, from_position: int, name: str | None = None
    ) -> AsyncIterator[RecordedEvent]:
        clauses, parameters = _filter_sql(filter)
        last = from_position - 1
        while True:
            committed = self._committed  # taken before reading: a commit after it sets it
            head = await self._scalar("SELECT max(position) FROM events")
            if head > last:
                async for rows in self._scan(last, head, clauses, parameters, _everything):
                    for event in self._decoded(rows):
                        yield event
                last = head
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):  # other processes' commits
                    await committed.wait()
            self._check_open()

    async def _head_position(self) -> int:
        return await self._scalar("SELECT max(position) FROM events")

    async def _stream_version(self, stream: str) -> int:
        return await self._scalar("SELECT max(version) FROM events WHERE stream = ?", (stream,))

    async def _stream_count(self, stream: str) -> int:
        return await self._scalar("SELECT count(*) FROM events WHERE stream = ?", (stream,))

    async def _streams(self, category: str | None) -> AsyncIterator[str]:
        where, parameters = ("WHERE category = ?", (category,)) if category else ("", ())
        rows = await self._fetch(
            f"SELECT DISTINCT stream FROM events {where} ORDER BY stream", parameters
        )
        for (stream,) in rows:
            yield stream

    async def _event(self, id: str) -> RecordedEvent | None:
        rows = await self._fetch(
            "SELECT position, stream, version, body FROM events WHERE id = ?", (id,)
        )
        for position, stream, version, body in rows:
            return self.decode(body, position, self._where, stream, version=version)
        return None


def _small(group: list[_Append]) -> bool:
    """True if a group is small enough to commit inline (see `_INLINE_MAX_EVENTS`)."""
    events = [event for waiting in group for event in waiting.events]
    return len(events) <= _INLINE_MAX_EVENTS and (
        sum(len(event.data) for event in events) <= _INLINE_MAX_BYTES
    )


def _require_file(path: str) -> None:
    """Raise StoreNotFoundError, naming the .db files beside it, when `path` does not exist."""
    if os.path.exists(path):
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        nearby = sorted(name for name in os.listdir(folder) if name.endswith(".db"))
    except OSError:
        nearby = []
    raise StoreNotFoundError(
        where=f"SQLite file {path!r}",
        existing=[os.path.join(folder, name) for name in nearby[:10]],
        hint="check the path (sqlite:///absolute/path.db, sqlite://relative/path.db); a store "
        "file is created by the first append (fuse publish), never by a command that only reads",
    )


def _nothing() -> None:
    """Run on a thread to wait for what that thread was given before."""


def _everything() -> None:
    """A scan's `left` when there is no limit."""
    return None


def _fetch_all(connection: sqlite3.Connection, sql: str, parameters: Sequence[Any]) -> list[Any]:
    """On the connection's thread: every row of one query."""
    return connection.execute(sql, parameters).fetchall()


def _rollback(connection: sqlite3.Connection) -> None:
    """On the connection's thread: end the open transaction, if any, keeping the first error."""
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


def _filter_sql(filter: EventFilter) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    parameters: list[Any] = []
    for column, values in (
        ("stream", filter.streams),
        ("category", filter.categories),
        ("type", filter.types),
    ):
        if values:
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
            parameters.extend(values)
    if filter.correlation_id is not None:
        clauses.append("correlation_id = ?")
        parameters.append(filter.correlation_id)
    return clauses, parameters


def _replayed(
    stream: str, ids: list[str], known: list[tuple[str, int, int] | None]
) -> AppendResult | DuplicateEventError:
    """The first result when `ids` were appended before as one batch to `stream`, else an error."""
    places = [place for place in known if place is not None]
    if len(places) == len(ids):
        versions = [version for _, version, _ in places]
        if all(place[0] == stream for place in places) and versions == list(
            range(versions[0], versions[0] + len(ids))
        ):
            return AppendResult.of(stream, ids, versions[0], places[0][2], places[-1][2])
    index = next(i for i, place in enumerate(known) if place is not None)
    where, version, position = places[0]
    return DuplicateEventError(
        stream=stream,
        event_id=ids[index],
        reason=(
            f"was appended before to {where!r} at version {version} (position {position}), "
            f"not in a batch like this one; retry with the original batch, or give new events "
            f"new ids"
        ),
    )


def _as_bytes(value: object) -> bytes:
    """A body column as bytes, whatever a hand-edited file made of it (TEXT, a number)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8", "surrogateescape")
