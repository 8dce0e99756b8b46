"""The seed's Transaction view as a SQLite projection: one row per saga, its fold kept.

The `transactions` projection keeps, per saga, the fold of its
stream (`SagaState`, core/saga.py: the same fold the orchestrator decides by, so what later
versions add to it shows here too) and the columns people query: readers use the view
`transactions_sagas` with columns id, name, status (the saga's: active, compensating,
committed, rolled_back, stuck), transaction_status (the seed's: active, committed,
rolled_back), operations (JSON, `Transaction.operations`), steps (JSON: each step's status,
phase, attempts, output, error and history), started_at, ended_at, timestamp (ISO-8601 UTC,
sortable text), failed_step, error, version (of the saga's stream), position (the last event
folded), ignored (JSON: events of the stream the fold did not apply, with why) and state (the
fold itself, JSON).

It reads the whole log (skipping other categories) and is a projection like the audit index
(projections/runner.py): each batch and its checkpoint in one SQLite transaction, so an event
is folded once; `fuse projections rebuild transactions` replays into a fresh generation and
swaps it in. An event the fold does not fit (a foreign saga's, an unregistered type, one
before `saga.started`) is noted in `ignored`, never raised; one that would make the row larger
than `MAX_ROW_BYTES` is a dead letter (TransactionViewError) and the row stays as it was.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import datetime
from typing import Any, Final

import aiosqlite
import msgspec

from newfuse._closing import AsyncClosing
from newfuse.core.orchestrator import CATEGORY
from newfuse.core.saga import SagaState
from newfuse.errors import ReadModelUnavailableError, TransactionViewError
from newfuse.projections.audit import readonly_uri, sortable_time
from newfuse.projections.base import Projection
from newfuse.projections.sqlite_model import SQLiteBatch, view_name
from newfuse.schemas import RecordedEvent

NAME: Final = "transactions"
VIEW: Final = view_name(NAME, "sagas")
MAX_ROW_BYTES: Final = 512 * 1024
"""The largest fold a row keeps (its input, outputs and histories together)."""
MAX_IGNORED: Final = 20
"""Ignored events a row names at most (the newest; a hostile writer cannot grow a row)."""
MAX_HISTORY: Final = 200
"""History lines a step keeps at most (the first and the newest halves)."""

_STATE = msgspec.json.Decoder(SagaState)
_ENCODER = msgspec.json.Encoder()
_COLUMNS: Final = (
    "id",
    "name",
    "status",
    "transaction_status",
    "operations",
    "steps",
    "started_at",
    "ended_at",
    "timestamp",
    "failed_step",
    "error",
    "version",
    "position",
    "ignored",
    "state",
)


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else sortable_time(moment)


async def _setup(batch: SQLiteBatch) -> None:
    table = batch.table("sagas")
    await batch.execute(
        f'CREATE TABLE "{table}" (id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, '
        "transaction_status TEXT NOT NULL, operations TEXT NOT NULL, steps TEXT NOT NULL, "
        "started_at TEXT, ended_at TEXT, timestamp TEXT NOT NULL, failed_step TEXT, error TEXT, "
        "version INTEGER NOT NULL, position INTEGER NOT NULL, ignored TEXT NOT NULL, "
        "state TEXT NOT NULL)"
    )
    await batch.execute(f'CREATE INDEX "{table}_started" ON "{table}" (started_at, id)')
    await batch.execute(f'CREATE INDEX "{table}_status" ON "{table}" (status, started_at, id)')


def steps_json(state: SagaState) -> list[dict[str, Any]]:
    """Each step of `state` with what happened to it (as `fuse sagas` prints it)."""
    return [
        {
            "name": step.name,
            "group": step.group,
            "status": step.status,
            "phase": step.phase,
            "attempts": step.attempts,
            "output": step.output,
            "error": step.error,
            "history": step.history,
        }
        for step in state.steps.values()
    ]


def _bound(state: SagaState) -> None:
    """Cap what a hostile writer could grow without end: ignored events, step histories."""
    if len(state.ignored) > MAX_IGNORED:
        state.ignored[:] = ["(earlier ones not kept)", *state.ignored[1 - MAX_IGNORED :]]
    for step in state.steps.values():
        if len(step.history) > MAX_HISTORY:
            half = MAX_HISTORY // 2
            step.history[:] = [*step.history[: half - 1], "(lines not kept)", *step.history[-half:]]


def _row(state: SagaState, position: int) -> tuple[Any, ...]:
    transaction = state.transaction()
    encoded = _ENCODER.encode(state)
    if len(encoded) > MAX_ROW_BYTES:
        raise TransactionViewError(
            saga_id=state.id,
            position=position,
            reason=f"its fold would be {len(encoded):,} bytes, over the row's "
            f"{MAX_ROW_BYTES:,}; the row keeps the fold before this event",
        )
    return (
        state.id,
        state.name,
        state.status,
        transaction.status,
        _ENCODER.encode(transaction.operations).decode(),
        _ENCODER.encode(steps_json(state)).decode(),
        _time(state.started_at),
        _time(state.ended_at),
        _time(transaction.timestamp),
        state.failed_step,
        state.error,
        state.version,
        position,
        _ENCODER.encode(state.ignored).decode(),
        encoded.decode(),
    )


def decode_state(text: str | bytes, *, saga_id: str, position: int) -> SagaState:
    """A row's stored fold.

    Raises:
        TransactionViewError: it does not decode as this version's SagaState.
    """
    try:
        return _STATE.decode(text)
    except msgspec.ValidationError as error:
        raise TransactionViewError(
            saga_id=saga_id,
            position=position,
            reason=f"its stored fold does not decode ({error}); rebuild the projection "
            "(`fuse projections rebuild transactions`)",
        ) from error


def transactions_projection() -> Projection[SQLiteBatch]:
    """The `transactions` projection: every saga's stream folded into one row of
    `transactions_sagas` (see the module docstring)."""
    # It reads every category, not only `saga`: its checkpoint then follows the head, so its
    # lag in `fuse projections status` is the log's and not the distance to the newest event
    # of another category (a filtered runner stops at the last event it was given).
    projection: Projection[SQLiteBatch] = Projection(NAME, setup=_setup)

    @projection.on("*")
    async def _fold(event: RecordedEvent, batch: SQLiteBatch) -> None:
        category, _, saga_id = event.stream.partition(".")
        if category != CATEGORY:
            return
        table = batch.table("sagas")
        rows = await batch.fetchall(f'SELECT state FROM "{table}" WHERE id = ?', (saga_id,))
        if rows:
            state = decode_state(rows[0][0], saga_id=saga_id, position=event.position)
            if event.version <= state.version:  # folded already (the log repeats nothing)
                return
        else:
            state = SagaState(saga_id)
        state.apply(event)
        if not state.name:  # no saga.started yet: nothing to show (and nothing to keep)
            return
        _bound(state)
        placeholders = ",".join("?" * len(_COLUMNS))
        batch.defer(
            f'INSERT OR REPLACE INTO "{table}" ({",".join(_COLUMNS)}) VALUES ({placeholders})',
            _row(state, event.position),
        )

    return projection


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """How far the projection is: its checkpoint and what its runner last reported."""

    generation: int
    checkpoint: int
    runner: str
    """`running`, `stopped`, ... as its runner last reported, or `not running`."""


class TransactionView(AsyncClosing):
    """Reads the `transactions` projection of a SQLite read model file, read-only.

    Example:
        async with await TransactionView.open("audit.db") as view:
            if await view.progress() is not None:
                committed = await view.sagas(status="committed", limit=20)
    """

    def __init__(self, path: str, connection: aiosqlite.Connection) -> None:
        self.path = path
        self.connection = connection
        self._closed = False

    @classmethod
    async def open(cls, path: str) -> TransactionView:
        """Open the read model file at `path` read-only.

        Raises:
            ReadModelUnavailableError: the file does not exist or cannot be read.
        """
        if not await asyncio.to_thread(os.path.exists, path):
            raise ReadModelUnavailableError(
                model=f"sqlite {path}",
                operation="open the transactions view",
                reason="no such file (`fuse projections run transactions` or `fuse dev` makes it)",
            )
        try:
            connection = await aiosqlite.connect(readonly_uri(path), uri=True)
            await connection.execute("PRAGMA busy_timeout = 5000")
        except sqlite3.Error as error:
            raise ReadModelUnavailableError(
                model=f"sqlite {path}", operation="open the transactions view", reason=str(error)
            ) from error
        return cls(path, connection)

    async def _rows(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return list(await self.connection.execute_fetchall(sql, parameters))
        except sqlite3.Error as error:
            raise ReadModelUnavailableError(
                model=f"sqlite {self.path}",
                operation="read the transactions view",
                reason=str(error),
            ) from error

    async def progress(self) -> Progress | None:
        """Where the projection is; None when this file holds no built `transactions`."""
        tables = await self._rows(
            "SELECT name FROM sqlite_master WHERE name IN ('_fuse_projections', ?)", (VIEW,)
        )
        if len(tables) < 2:
            return None
        rows = await self._rows(
            "SELECT p.active, c.position, s.body FROM _fuse_projections p "
            "LEFT JOIN _fuse_checkpoints c ON c.name = p.name AND c.generation = p.active "
            "LEFT JOIN _fuse_stats s ON s.name = p.name WHERE p.name = ?",
            (NAME,),
        )
        if not rows or rows[0][0] is None:
            return None
        active, position, stats = rows[0]
        runner = "not running"
        if stats is not None:
            runner = str(msgspec.json.decode(stats).get("state", runner))
        return Progress(generation=int(active), checkpoint=int(position or 0), runner=runner)

    async def sagas(
        self, *, status: str | None = None, limit: int | None = None
    ) -> list[SagaState]:
        """The sagas the projection holds, oldest first (with `limit`: the newest `limit` of
        them, still oldest first), only those in `status` when given."""
        where, parameters = ("WHERE status = ?", (status,)) if status else ("", ())
        sql = f"SELECT id, position, state FROM {VIEW} {where} ORDER BY started_at DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = await self._rows(sql, parameters)
        return [decode_state(state, saga_id=i, position=p) for i, p, state in reversed(rows)]

    async def saga(self, saga_id: str) -> SagaState | None:
        """One saga's fold as the projection holds it (None: not there, or not yet)."""
        rows = await self._rows(f"SELECT position, state FROM {VIEW} WHERE id = ?", (saga_id,))
        if not rows:
            return None
        return decode_state(rows[0][1], saga_id=saga_id, position=rows[0][0])

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        if not self._closed:
            self._closed = True
            await self.connection.close()
