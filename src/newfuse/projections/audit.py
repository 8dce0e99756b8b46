"""The built-in audit index (SQLite): one row per event, indexed for who did what, when, on whose
behalf; queried through a Python API or raw SQL on a connection SQLite makes read-only.

Readers use the view `audit_events` (always the active generation). Its columns: position,
time (ISO-8601 UTC, sortable text), stream, category, type, schema_version, event_id, sender,
agent, correlation_id, causation_id, trace_id, payload (JSON text).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import aiosqlite
import msgspec

from newfuse._closing import AsyncClosing
from newfuse.errors import QueryTimeoutError, ReadModelUnavailableError, ReadOnlyQueryError
from newfuse.projections.base import Projection
from newfuse.projections.sqlite_model import SQLiteBatch, view_name
from newfuse.schemas import A2AMessage, RecordedEvent, as_utc

NAME: Final = "audit"
VIEW: Final = view_name(NAME, "events")
COLUMNS: Final = (
    "position",
    "time",
    "stream",
    "category",
    "type",
    "schema_version",
    "event_id",
    "sender",
    "agent",
    "correlation_id",
    "causation_id",
    "trace_id",
    "payload",
)
_ENCODER = msgspec.json.Encoder()
DEFAULT_SQL_TIME_LIMIT: Final = 30.0
"""Seconds a raw SQL query may run before it is stopped (None in `AuditIndex.sql`: no limit)."""
_PROGRESS_EVERY: Final = 1000  # SQLite VM steps between time checks: about a millisecond


def sortable_time(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC (sortable text); isoformat is ~5x faster than
    strftime, which showed in the profile of an index rebuild. A naive time is taken as UTC, as
    the event store takes it."""
    utc = as_utc(moment).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def _sender(event: RecordedEvent) -> str | None:
    if "sender" in event.metadata:
        return event.metadata["sender"]
    data = event.data
    if isinstance(data, A2AMessage):
        return data.metadata.sender
    if isinstance(data, dict):
        metadata = data.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("sender"), str):
            return str(metadata["sender"])
    return None


def readonly_uri(path: str) -> str:
    """The `file:` URI that opens `path` read-only (SQLite then refuses every write)."""
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"


# mode=ro covers the main database file only: ATTACH could still create or write another file,
# and some pragmas change the connection. The authorizer refuses those before they run.
_REFUSED_ACTIONS = frozenset({sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH})
_PRAGMAS_ON_A_TABLE = frozenset(
    {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
_PRAGMAS_TO_READ = frozenset(
    {
        "database_list",
        "compile_options",
        "user_version",
        "schema_version",
        "page_count",
        "page_size",
        "freelist_count",
        "function_list",
        "pragma_list",
        "collation_list",
    }
)


def _read_only_authorizer(
    action: int, arg1: str | None, arg2: str | None, database: str | None, trigger: str | None
) -> int:
    """SQLite authorizer of the audit connection: no ATTACH/DETACH, no pragma that sets."""
    if action in _REFUSED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA:
        allowed = arg1 in _PRAGMAS_ON_A_TABLE or (arg1 in _PRAGMAS_TO_READ and arg2 is None)
        return sqlite3.SQLITE_OK if allowed else sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _trace_id(event: RecordedEvent) -> str | None:
    if event.trace is None:
        return None
    parts = event.trace.traceparent.split("-")
    return parts[1] if len(parts) >= 4 else None


async def _setup(batch: SQLiteBatch) -> None:
    table = batch.table("events")
    await batch.execute(
        f'CREATE TABLE "{table}" (position INTEGER PRIMARY KEY, time TEXT NOT NULL, '
        "stream TEXT NOT NULL, category TEXT NOT NULL, type TEXT NOT NULL, "
        "schema_version INTEGER NOT NULL, event_id TEXT NOT NULL, sender TEXT, agent TEXT, "
        "correlation_id TEXT, causation_id TEXT, trace_id TEXT, payload TEXT NOT NULL)"
    )
    for suffix, columns in (
        ("time", "time"),
        ("stream", "stream, position"),
        ("type", "type, position"),
        ("sender", "sender, position"),
        ("agent", "agent, position"),
        ("correlation", "correlation_id, position"),
        ("trace", "trace_id"),
    ):
        await batch.execute(f'CREATE INDEX "{table}_{suffix}" ON "{table}" ({columns})')


def audit_projection() -> Projection[SQLiteBatch]:
    """The `audit` projection: every event becomes one row of `audit_events`."""
    projection: Projection[SQLiteBatch] = Projection(NAME, setup=_setup)

    @projection.on("*")
    def _index(event: RecordedEvent, batch: SQLiteBatch) -> None:
        envelope = event.envelope
        sender = _sender(event)
        category, _, ident = envelope.stream.partition(".")
        # Deferred: a batch's rows reach SQLite as one executemany (one thread round trip).
        batch.defer(
            f'INSERT INTO "{batch.table("events")}" VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)',
            (
                event.position,
                sortable_time(envelope.timestamp),
                envelope.stream,
                category,
                envelope.type,
                envelope.schema_version,
                envelope.id,
                sender,
                ident if category == "agent" else sender,
                envelope.correlation_id,
                envelope.causation_id,
                _trace_id(event),
                bytes(envelope.data).decode(),
            ),
        )

    return projection


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the audit index."""

    position: int
    time: datetime
    stream: str
    category: str
    type: str
    schema_version: int
    event_id: str
    sender: str | None
    agent: str | None
    correlation_id: str | None
    causation_id: str | None
    trace_id: str | None
    payload: Any


class SQLResult(msgspec.Struct, frozen=True, kw_only=True):
    """The columns and rows a raw SQL query returned."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


class _Limit:
    """One query's SQLite progress handler: non-zero ends the statement with 'interrupted'.

    Called on aiosqlite's thread; `abandoned` is set from the event loop when the caller stops
    waiting (a bool store is atomic under the GIL).
    """

    __slots__ = ("abandoned", "deadline")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.abandoned = False

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def __call__(self) -> int:
        return int(self.abandoned or self.expired())


def _refusal(text: str) -> str:
    if "readonly" in text or "read-only" in text or "not authorized" in text:
        return (
            "the audit connection is read-only (SQLite opened it with mode=ro); "
            "use SELECT statements only"
        )
    return f"SQLite: {text}"


class AuditIndex(AsyncClosing):
    """Queries the audit index of a SQLite read model file, on a read-only connection.

    The connection is opened with `file:...?mode=ro`, so SQLite itself refuses writes, whatever
    SQL is given.

    Example:
        async with await AuditIndex.open("audit.db") as audit:
            rows = await audit.query(agent="researcher-1", since=yesterday, limit=50)
    """

    def __init__(self, path: str, connection: aiosqlite.Connection) -> None:
        self.path = path
        self.connection = connection
        self._closed = False
        self._one_at_a_time = asyncio.Lock()  # a query and its progress handler go together

    @classmethod
    async def open(cls, path: str) -> AuditIndex:
        """Open the read model file at `path` read-only.

        Raises:
            ReadModelUnavailableError: the file does not exist or cannot be read.
        """
        uri = readonly_uri(path)
        try:
            connection = await aiosqlite.connect(uri, uri=True)
            await connection.execute("PRAGMA busy_timeout = 5000")
            await connection.set_authorizer(_read_only_authorizer)
        except sqlite3.Error as error:
            raise ReadModelUnavailableError(
                model=f"sqlite {path}",
                operation="open the audit index read-only",
                reason=str(error),
            ) from error
        return cls(path, connection)

    async def query(
        self,
        *,
        agent: str | None = None,
        type: str | None = None,
        stream: str | None = None,
        correlation_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = 100,
        newest_first: bool = False,
        time_limit: float | None = DEFAULT_SQL_TIME_LIMIT,
    ) -> list[AuditRecord]:
        """Events matching every filter given, by position.

        Args:
            agent: sent by this agent, or in its stream `agent.<id>`.
            type: of this event type.
            stream: of this stream.
            correlation_id: of this conversation or saga.
            since: written at or after this time.
            until: written before this time.
            limit: at most this many (None: all).
            newest_first: highest positions first.
            time_limit: seconds the query may run (None: no limit), as in `sql`.
        """
        clauses: list[str] = []
        parameters: list[Any] = []
        if agent is not None:
            clauses.append("(agent = ? OR sender = ?)")
            parameters += [agent, agent]
        equal = (("type", type), ("stream", stream), ("correlation_id", correlation_id))
        for column, value in equal:
            if value is not None:
                clauses.append(f"{column} = ?")
                parameters.append(value)
        if since is not None:
            clauses.append("time >= ?")
            parameters.append(sortable_time(since))
        if until is not None:
            clauses.append("time < ?")
            parameters.append(sortable_time(until))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {', '.join(COLUMNS)} FROM {VIEW}{where} ORDER BY position {order}"
        if limit is not None:
            sql += " LIMIT ?"
            parameters.append(limit)
        result = await self.sql(sql, parameters, time_limit=time_limit)
        return [
            AuditRecord(
                position=row[0],
                time=datetime.fromisoformat(row[1]),
                stream=row[2],
                category=row[3],
                type=row[4],
                schema_version=row[5],
                event_id=row[6],
                sender=row[7],
                agent=row[8],
                correlation_id=row[9],
                causation_id=row[10],
                trace_id=row[11],
                payload=msgspec.json.decode(row[12]),
            )
            for row in result.rows
        ]

    async def sql(
        self,
        statement: str,
        parameters: Sequence[Any] = (),
        *,
        time_limit: float | None = DEFAULT_SQL_TIME_LIMIT,
    ) -> SQLResult:
        """Run raw SQL on the read-only connection (query the view `audit_events`).

        Columns keep their order and their names, duplicates included. A query still running
        after `time_limit` seconds (None: no limit) is stopped; so is one whose caller is
        cancelled (Ctrl-C), instead of running on in SQLite's thread.

        Raises:
            ReadOnlyQueryError: the statement tries to write, or SQLite rejects it.
            QueryTimeoutError: the query ran past `time_limit`.
        """
        limit = _Limit(None if time_limit is None else time.monotonic() + time_limit)
        async with self._one_at_a_time:
            # Set on aiosqlite's thread, in order: it takes effect when this query starts, not
            # while an abandoned one before it is still being stopped.
            await self.connection.set_progress_handler(limit, _PROGRESS_EVERY)
            try:
                async with self.connection.execute(statement, parameters) as cursor:
                    rows = [tuple(row) for row in await cursor.fetchall()]
                    columns = [column[0] for column in cursor.description or ()]
            except asyncio.CancelledError:
                limit.abandoned = True  # the thread's next progress check ends the query
                raise
            except sqlite3.Error as error:
                if time_limit is not None and limit.expired():
                    raise QueryTimeoutError(
                        database=self.path, sql=statement, time_limit=time_limit
                    ) from error
                raise ReadOnlyQueryError(
                    database=self.path, sql=statement, reason=_refusal(str(error))
                ) from error
        return SQLResult(columns=columns, rows=rows)

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        if not self._closed:
            self._closed = True
            await self.connection.close()
