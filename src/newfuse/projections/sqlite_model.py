"""Projections in SQLite: each batch and its checkpoint in one transaction, generations as
tables, and views (one per table) that always select from the active generation.

A projection `n` that creates a table `t` (with `SQLiteBatch.table("t")`) gets the physical table
`p_n_g<g>_t` per generation and the view `n_t`, which readers query. Swapping generations
redefines the views and the pointer in one transaction, so every query sees one generation whole.
Bookkeeping tables: `_fuse_projections` (pointer), `_fuse_checkpoints`, `_fuse_tables`,
`_fuse_dead_letters`, `_fuse_stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import aiosqlite
import msgspec

from newfuse.errors import InvalidNameError, ReadModelUnavailableError, RebuildConflictError
from newfuse.projections.base import (
    Batch,
    BatchConflict,
    DeadLetter,
    DeferredWriteError,
    Projection,
    ReadModel,
    RunnerStats,
)

_BASE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_DEAD_DECODER = msgspec.json.Decoder(DeadLetter)
_STATS_DECODER = msgspec.json.Decoder(RunnerStats)
_ENCODER = msgspec.json.Encoder()

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS _fuse_projections (
        name TEXT PRIMARY KEY, active INTEGER, generations INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS _fuse_checkpoints (
        name TEXT NOT NULL, generation INTEGER NOT NULL, position INTEGER NOT NULL,
        PRIMARY KEY (name, generation))""",
    """CREATE TABLE IF NOT EXISTS _fuse_tables (
        name TEXT NOT NULL, generation INTEGER NOT NULL, base TEXT NOT NULL,
        PRIMARY KEY (name, generation, base))""",
    """CREATE TABLE IF NOT EXISTS _fuse_dead_letters (
        name TEXT NOT NULL, generation INTEGER NOT NULL, position INTEGER NOT NULL,
        body TEXT NOT NULL, PRIMARY KEY (name, generation, position))""",
    """CREATE TABLE IF NOT EXISTS _fuse_stats (name TEXT PRIMARY KEY, body TEXT NOT NULL)""",
)


def physical_table(name: str, generation: int, base: str) -> str:
    """The table holding `base` of projection `name` in `generation`."""
    return f"p_{name}_g{generation}_{base}"


def view_name(name: str, base: str) -> str:
    """The view readers query for `base` of projection `name` (always the active generation)."""
    return f"{name}_{base}"


_OUTAGE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
    }
)
"""SQLite result codes that mean the database cannot take writes now (not a bad event)."""


class SQLiteBatch(Batch):
    """A transaction on the read model's connection; handlers run SQL on it directly.

    Use `table("t")` for the physical name of a model table in this generation; reads inside a
    handler see the batch's own earlier writes (deferred ones included: `execute`,
    `executemany` and `fetchall` flush them first).
    """

    def __init__(self, *, projection: str, generation: int, connection: aiosqlite.Connection):
        super().__init__(projection=projection, generation=generation)
        self.connection = connection
        self.tables: set[str] = set()
        self._physical: dict[str, str] = {}
        self._deferred: list[tuple[str, list[Sequence[Any]]]] = []

    def table(self, base: str) -> str:
        """The physical table of `base` in this generation (letters, digits, `_`)."""
        table = self._physical.get(base)
        if table is None:
            if not _BASE_RE.match(base):
                raise InvalidNameError(
                    kind="table name", name=base, reason="use a letter, then letters, digits or '_'"
                )
            self.tables.add(base)
            table = self._physical[base] = physical_table(self.projection, self.generation, base)
        return table

    def defer(self, sql: str, parameters: Sequence[Any] = ()) -> None:
        """Queue a write; a run of deferred writes with the same SQL goes to SQLite as one
        `executemany`, before the batch's next statement or at its commit.

        This saves a round trip to SQLite's thread per event. Its error (a constraint, say)
        shows at the flush; the runner then re-applies the batch in halves until the failing
        event is alone, and that event is retried and dead-lettered like any poison event.
        Handlers that use `connection` directly must call `flush()` first.
        """
        if self._deferred and self._deferred[-1][0] == sql:
            self._deferred[-1][1].append(parameters)
        else:
            self._deferred.append((sql, [parameters]))

    async def flush(self) -> None:
        """Send the deferred writes, in the order they were queued.

        Raises:
            DeferredWriteError: SQLite refused one of them (the batch is then discarded).
        """
        deferred, self._deferred = self._deferred, []
        for sql, rows in deferred:
            try:
                await self.connection.executemany(sql, rows)
            except sqlite3.Error as error:
                self._raise_if_outage(error)
                raise DeferredWriteError(error) from error

    def _raise_if_outage(self, error: sqlite3.Error) -> None:
        """A full disk, an I/O error or a lock is the model's outage, not the event's fault:
        the runner then waits and resumes instead of dead-lettering good events."""
        if getattr(error, "sqlite_errorcode", 0) & 0xFF in _OUTAGE_CODES:
            raise ReadModelUnavailableError(
                model=f"SQLite model of projection {self.projection!r}",
                operation="write a batch",
                reason=str(error),
            ) from error

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> None:
        """Run one statement (after the deferred writes)."""
        if self._deferred:
            await self.flush()
        try:
            await self.connection.execute(sql, parameters)
        except sqlite3.Error as error:
            self._raise_if_outage(error)
            raise

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters (after the deferred writes)."""
        if self._deferred:
            await self.flush()
        try:
            await self.connection.executemany(sql, rows)
        except sqlite3.Error as error:
            self._raise_if_outage(error)
            raise

    async def fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """Run a query and return its rows (after the deferred writes)."""
        if self._deferred:
            await self.flush()
        try:
            return list(await self.connection.execute_fetchall(sql, parameters))
        except sqlite3.Error as error:
            self._raise_if_outage(error)
            raise


class SQLiteReadModel(ReadModel[SQLiteBatch]):
    """A SQLite file holding projections; see the module docstring for its tables and views.

    Example:
        async with await SQLiteReadModel.open("/var/lib/fuse/audit.db") as model:
            runner = ProjectionRunner(audit_projection(), store, model)
    """

    def __init__(self, path: str, connection: aiosqlite.Connection) -> None:
        self.path = path
        self.connection = connection
        self.description = f"sqlite {path}"
        self._lock = asyncio.Lock()
        self._closed = False
        self._registered: set[tuple[str, int, str]] = set()

    @classmethod
    async def open(cls, path: str, *, busy_timeout: float = 5.0) -> SQLiteReadModel:
        """Open (creating if needed) the read model file at `path`, in WAL mode.

        Raises:
            ReadModelUnavailableError: the file cannot be opened or set up.
        """
        try:
            connection = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as error:
            raise ReadModelUnavailableError(
                model=f"sqlite {path}", operation="open", reason=str(error)
            ) from error
        model = cls(path, connection)
        try:
            with model._guard("set up"):
                await connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
                await connection.execute("PRAGMA journal_mode = WAL")
                await connection.execute("PRAGMA synchronous = FULL")
                # A dropped generation's pages are zeroed, not left in the free list: a read
                # model rebuilt after `fuse forget` keeps no plaintext of the forgotten fields.
                await connection.execute("PRAGMA secure_delete = ON")
                for statement in _SCHEMA:
                    await connection.execute(statement)
        except BaseException:
            await model.close()
            raise
        return model

    @contextlib.contextmanager
    def _guard(self, operation: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            raise ReadModelUnavailableError(
                model=self.description, operation=operation, reason=str(error)
            ) from error

    @contextlib.asynccontextmanager
    async def _transaction(self, operation: str) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE (the write lock up front) ... COMMIT, or ROLLBACK on any error."""
        async with self._lock:
            if self.connection.in_transaction:
                # A batch cancelled while its BEGIN waited for the lock left it open: end it.
                with self._guard(operation):
                    await self.connection.rollback()
            with self._guard(operation):
                await self.connection.execute("BEGIN IMMEDIATE")
            try:
                yield self.connection
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self.connection.rollback()
                raise
            with self._guard(operation):
                try:
                    await self.connection.commit()
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        await self.connection.rollback()
                    raise

    async def _scalar(self, sql: str, parameters: Sequence[Any]) -> Any:
        rows = list(await self.connection.execute_fetchall(sql, parameters))
        return rows[0][0] if rows else None

    async def _finish(self, batch: SQLiteBatch) -> bool:
        """Write what a batch collected: its tables, dead letters and checkpoint; True if the
        batch used a table this model had not seen in that generation."""
        connection, name, generation = self.connection, batch.projection, batch.generation
        new = {(name, generation, base) for base in batch.tables} - self._registered
        if new:
            await self._check_names_free(name, generation, {base for _, _, base in new})
        if batch.tables:
            await connection.executemany(
                "INSERT OR IGNORE INTO _fuse_tables (name, generation, base) VALUES (?, ?, ?)",
                [(name, generation, base) for base in sorted(batch.tables)],
            )
        if batch.dead:
            await connection.executemany(
                "INSERT OR REPLACE INTO _fuse_dead_letters (name, generation, position, body) "
                "VALUES (?, ?, ?, ?)",
                [(name, generation, d.position, _ENCODER.encode(d).decode()) for d in batch.dead],
            )
        if batch.advanced_to is not None:
            await connection.execute(
                "INSERT INTO _fuse_checkpoints (name, generation, position) VALUES (?, ?, ?) "
                "ON CONFLICT (name, generation) DO UPDATE SET position = excluded.position",
                (name, generation, batch.advanced_to),
            )
        return bool(new)

    async def _check_names_free(self, name: str, generation: int, bases: set[str]) -> None:
        """Refuse a table whose view or physical name is another projection's (`agent` +
        `state_log` and `agent_state` + `log` would share the view `agent_state_log`)."""
        others = await self.connection.execute_fetchall(
            "SELECT name, generation, base FROM _fuse_tables WHERE name != ?", (name,)
        )
        for other, other_generation, other_base in others:
            for base in bases:
                if view_name(other, other_base) == view_name(name, base) or physical_table(
                    other, other_generation, other_base
                ) == physical_table(name, generation, base):
                    raise InvalidNameError(
                        kind="projection table",
                        name=f"{name}.{base}",
                        reason=f"its SQL names collide with table {other_base!r} of projection "
                        f"{other!r} ({view_name(name, base)!r}); rename the table or projection",
                    )
        self._registered.update((name, generation, base) for base in bases)

    async def _point_views(self, name: str, generation: int, old: int | None) -> None:
        connection = self.connection
        if old is not None:
            for (base,) in await connection.execute_fetchall(
                "SELECT base FROM _fuse_tables WHERE name = ? AND generation = ?", (name, old)
            ):
                await connection.execute(f'DROP VIEW IF EXISTS "{view_name(name, base)}"')
        for (base,) in await connection.execute_fetchall(
            "SELECT base FROM _fuse_tables WHERE name = ? AND generation = ?", (name, generation)
        ):
            view = view_name(name, base)
            await connection.execute(f'DROP VIEW IF EXISTS "{view}"')
            await connection.execute(
                f'CREATE VIEW "{view}" AS SELECT * FROM "{physical_table(name, generation, base)}"'
            )

    # -- ReadModel ---------------------------------------------------------------------------------

    async def active_generation(self, name: str) -> int | None:
        async with self._lock:
            with self._guard(f"read the active generation of {name!r}"):
                value = await self._scalar(
                    "SELECT active FROM _fuse_projections WHERE name = ?", (name,)
                )
        return int(value) if value is not None else None

    async def checkpoint(self, name: str, generation: int | None = None) -> int:
        if generation is None:
            generation = await self.active_generation(name)
            if generation is None:
                return 0
        async with self._lock:
            with self._guard(f"read the checkpoint of {name!r}"):
                value = await self._scalar(
                    "SELECT position FROM _fuse_checkpoints WHERE name = ? AND generation = ?",
                    (name, generation),
                )
        return int(value or 0)

    async def _allocate(self, projection: Projection[SQLiteBatch], *, activate: bool) -> int:
        name = projection.name
        async with self._transaction(f"create a generation of {name!r}") as connection:
            with self._guard(f"create a generation of {name!r}"):
                row = list(
                    await connection.execute_fetchall(
                        "SELECT active, generations FROM _fuse_projections WHERE name = ?",
                        (name,),
                    )
                )
                if activate and row and row[0][0] is not None:
                    return int(row[0][0])
                generation = (int(row[0][1]) if row else 0) + 1
                await connection.execute(
                    "INSERT INTO _fuse_projections (name, active, generations) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET generations = excluded.generations",
                    (name, None, generation),
                )
            batch = SQLiteBatch(projection=name, generation=generation, connection=connection)
            await projection.prepare(batch)
            await batch.flush()
            batch.advance(0)
            with self._guard(f"create generation {generation} of {name!r}"):
                await self._finish(batch)
                if activate:
                    await connection.execute(
                        "UPDATE _fuse_projections SET active = ? WHERE name = ?",
                        (generation, name),
                    )
                    await self._point_views(name, generation, None)
        return generation

    async def prepare(self, projection: Projection[SQLiteBatch]) -> int:
        return await self._allocate(projection, activate=True)

    async def new_generation(self, projection: Projection[SQLiteBatch]) -> int:
        return await self._allocate(projection, activate=False)

    @contextlib.asynccontextmanager
    async def batch(
        self, name: str, generation: int, expected_checkpoint: int, *, active: bool
    ) -> AsyncIterator[SQLiteBatch]:
        operation = f"apply a batch to {name!r} generation {generation}"
        async with self._transaction(operation) as connection:
            with self._guard(operation):
                # One round trip to SQLite's thread for both facts the batch depends on.
                rows = await connection.execute_fetchall(
                    "SELECT (SELECT position FROM _fuse_checkpoints WHERE name = ? "
                    "AND generation = ?), (SELECT active FROM _fuse_projections WHERE name = ?)",
                    (name, generation, name),
                )
                stored, pointer = next(iter(rows))
            if int(stored or 0) != expected_checkpoint or (active and pointer != generation):
                raise BatchConflict(f"{name!r}: checkpoint {stored}, active {pointer}")
            batch = SQLiteBatch(projection=name, generation=generation, connection=connection)
            yield batch
            await batch.flush()
            with self._guard(operation):
                created = await self._finish(batch)
                if created and active:
                    # A table first used by a handler (not in setup) gets its view now.
                    await self._point_views(name, generation, None)

    async def swap(self, name: str, generation: int, *, expected_active: int) -> bool:
        async with self._transaction(f"swap {name!r} to generation {generation}") as connection:
            pointer = await self._scalar(
                "SELECT active FROM _fuse_projections WHERE name = ?", (name,)
            )
            if pointer != expected_active:
                raise RebuildConflictError(
                    projection=name, expected=expected_active, actual=int(pointer or 0)
                )
            checkpoints: dict[int, int] = dict(
                await connection.execute_fetchall(  # type: ignore[arg-type]
                    "SELECT generation, position FROM _fuse_checkpoints WHERE name = ? "
                    "AND generation IN (?, ?)",
                    (name, generation, expected_active),
                )
            )
            if checkpoints.get(generation, 0) < checkpoints.get(expected_active, 0):
                return False
            await connection.execute(
                "UPDATE _fuse_projections SET active = ? WHERE name = ?", (generation, name)
            )
            await self._point_views(name, generation, expected_active)
        return True

    async def drop_generation(self, name: str, generation: int) -> None:
        async with self._transaction(f"drop {name!r} generation {generation}") as connection:
            pointer = await self._scalar(
                "SELECT active FROM _fuse_projections WHERE name = ?", (name,)
            )
            if pointer == generation:
                raise ValueError(f"drop {name!r} generation {generation}: it is the active one")
            for (base,) in await connection.execute_fetchall(
                "SELECT base FROM _fuse_tables WHERE name = ? AND generation = ?",
                (name, generation),
            ):
                table = physical_table(name, generation, base)
                await connection.execute(f'DROP TABLE IF EXISTS "{table}"')
            for table in ("_fuse_tables", "_fuse_checkpoints", "_fuse_dead_letters"):
                await connection.execute(
                    f"DELETE FROM {table} WHERE name = ? AND generation = ?", (name, generation)
                )
        async with self._lock:
            with self._guard(f"checkpoint after dropping {name!r} generation {generation}"):
                # The WAL may still hold frames of the dropped pages: fold them in, truncate it.
                await self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def dead_letters(self, name: str, generation: int | None = None) -> list[DeadLetter]:
        if generation is None:
            generation = await self.active_generation(name)
            if generation is None:
                return []
        async with self._lock:
            with self._guard(f"read the dead letters of {name!r}"):
                rows = await self.connection.execute_fetchall(
                    "SELECT body FROM _fuse_dead_letters WHERE name = ? AND generation = ? "
                    "ORDER BY position",
                    (name, generation),
                )
        return [_DEAD_DECODER.decode(body) for (body,) in rows]

    async def write_stats(self, name: str, stats: RunnerStats) -> None:
        async with self._lock:
            with self._guard(f"report the stats of {name!r}"):
                await self.connection.execute(
                    "INSERT OR REPLACE INTO _fuse_stats (name, body) VALUES (?, ?)",
                    (name, _ENCODER.encode(stats).decode()),
                )

    async def read_stats(self, name: str) -> RunnerStats | None:
        async with self._lock:
            with self._guard(f"read the stats of {name!r}"):
                body = await self._scalar("SELECT body FROM _fuse_stats WHERE name = ?", (name,))
        return _STATS_DECODER.decode(body) if body is not None else None

    async def projections(self) -> list[str]:
        async with self._lock:
            with self._guard("list projections"):
                rows = await self.connection.execute_fetchall(
                    "SELECT name FROM _fuse_projections WHERE active IS NOT NULL ORDER BY name"
                )
        return [name for (name,) in rows]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.connection.close()
