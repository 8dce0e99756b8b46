"""Files the SQLite store did not write, or that broke: every sqlite3 error comes out as a FuseError
that names the path and what to do, through the API and through `fuse`, never as a traceback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from newfuse.errors import (
    CorruptStoreFileError,
    ForeignStoreFileError,
    FuseError,
    SQLiteStoreError,
    StoreUnavailableError,
)
from newfuse.eventstore import EventFilter, open_event_store
from newfuse.eventstore.sqlite import SQLiteEventStore
from newfuse.schemas import NewEvent


def random_file(path: Path) -> Path:
    path.write_bytes(os.urandom(8192))
    return path


def foreign_file(path: Path, *tables: str) -> Path:
    """An SQLite database another application made."""
    connection = sqlite3.connect(path)
    for table in tables:
        connection.execute(f"CREATE TABLE {table}")
    connection.commit()
    connection.close()
    return path


def fuse_replay(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "newfuse", "--store", f"sqlite://{path}", "replay"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_file_that_is_not_a_database_is_refused_naming_it_and_left_as_it_is(
    tmp_path: Path,
) -> None:
    path = random_file(tmp_path / "random.db")
    before = path.read_bytes()
    with pytest.raises(
        CorruptStoreFileError,
        match=rf"'{path}' cannot be read: file is not a database .*restore it from a backup",
    ) as caught:
        await SQLiteEventStore.open(str(path))
    assert not caught.value.retryable and caught.value.path == str(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random.db"]


@pytest.mark.parametrize(
    ("tables", "found"),
    [
        (["users (id, name)", "orders (id)"], "its tables are orders, users"),
        (["events (a, b)"], "its events table has the columns a, b"),
    ],
)
async def test_another_applications_database_is_refused_and_not_changed(
    tmp_path: Path, tables: list[str], found: str
) -> None:
    path = foreign_file(tmp_path / "app.db", *tables)
    before = path.read_bytes()
    with pytest.raises(
        ForeignStoreFileError,
        match=rf"'{path}' is an SQLite database but not a newfuse event "
        rf"store \({found}\); it was left unchanged — point the store at a new file",
    ) as caught:
        await open_event_store(f"sqlite://{path}")
    assert not caught.value.retryable
    assert path.read_bytes() == before  # no table added, not switched to WAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


async def test_a_store_of_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with await SQLiteEventStore.open(str(path)) as store:
        await store.append("agent.a1", NewEvent(type="note", data={}))
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(ForeignStoreFileError, match=r"schema version is 99.*upgrade newfuse"):
        await SQLiteEventStore.open(str(path))


async def test_a_schema_version_1_file_is_upgraded_keeping_its_events_and_filtered_reads(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.db"
    async with await SQLiteEventStore.open(str(path)) as store:
        await store.append("agent.a1", NewEvent(type="note", data={}, correlation_id="c1"))
        await store.append("task.t1", NewEvent(type="other", data={}))
    connection = sqlite3.connect(path)  # what version 1 had on top of today's schema
    connection.execute("CREATE INDEX events_by_category ON events (category, position)")
    connection.execute("CREATE INDEX events_by_type ON events (type, position)")
    connection.execute(
        "CREATE INDEX events_by_correlation ON events (correlation_id, position) "
        "WHERE correlation_id IS NOT NULL"
    )
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()
    async with await SQLiteEventStore.open(str(path)) as store:
        await store.append("agent.a1", NewEvent(type="note", data={}, correlation_id="c1"))
        assert [
            e.version async for e in store.read_all(filter=EventFilter(categories=("agent",)))
        ] == [1, 2]
        assert [e.stream async for e in store.read_all(filter=EventFilter(types=("other",)))] == [
            "task.t1"
        ]
        assert len([e async for e in store.read_all(filter=EventFilter(correlation_id="c1"))]) == 2
    connection = sqlite3.connect(path)
    indexes = {
        name
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'events_by_%'"
        )
    }
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    connection.close()
    assert (indexes, version) == ({"events_by_time"}, 2)


async def test_pages_damaged_after_writing_fail_the_read_with_a_fuse_error(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with await SQLiteEventStore.open(str(path)) as store:
        for batch in range(20):
            events = [NewEvent(type="note", data={"text": "x" * 500}) for _ in range(10)]
            await store.append(f"agent.a{batch}", events)
    with path.open("r+b") as file:  # the schema (page 1) survives, the rows do not
        file.seek(4096 * 5)
        file.write(os.urandom(4096 * 10))
    async with await SQLiteEventStore.open(str(path)) as store:
        with pytest.raises(CorruptStoreFileError, match="database disk image is malformed"):
            async for _ in store.read_all():
                pass


async def test_other_sqlite_errors_are_fuse_errors_too(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with await SQLiteEventStore.open(str(path)) as store:
        mapped = [
            store._store_error("append to 'agent.a1'", error)
            for error in (
                sqlite3.IntegrityError("UNIQUE constraint failed: events.id"),
                sqlite3.OperationalError("database is locked"),
                sqlite3.InternalError("boom"),
            )
        ]
    assert [type(error) for error in mapped] == [
        SQLiteStoreError,
        StoreUnavailableError,
        SQLiteStoreError,
    ]
    assert all(isinstance(error, FuseError) for error in mapped)
    assert str(mapped[0]) == (
        "append to 'agent.a1': SQLite refused it (IntegrityError: UNIQUE constraint failed: "
        f"events.id); nothing was written — check the file with `sqlite3 {path} 'PRAGMA "
        "integrity_check'`, and report it if the file is sound"
    )
    assert not mapped[0].retryable and mapped[1].retryable


@pytest.mark.parametrize("kind", ["random", "foreign"])
def test_fuse_replay_on_a_bad_file_says_what_is_wrong_without_a_traceback(
    tmp_path: Path, kind: str
) -> None:
    if kind == "random":
        path, said = random_file(tmp_path / "bad.db"), "cannot be read: file is not a database"
    else:
        path, said = foreign_file(tmp_path / "bad.db", "users (id)"), "not a newfuse event store"
    result = fuse_replay(path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and said in result.stderr
