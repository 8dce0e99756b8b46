"""A SQLite event store on a file or directory nobody may write can still be opened and replayed;
appends to it fail at once, not retryable.

Tests run as root here, and root ignores file modes (chmod), so the file and its directory are
made immutable with `chattr +i` (ext4 and most Linux file systems): that refuses writes to root
too, as a read-only mount does.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from newfuse.errors import ReadOnlyStoreError, StoreFileError
from newfuse.eventstore import EventFilter, open_event_store
from newfuse.eventstore.sqlite import SQLiteEventStore
from newfuse.schemas import NewEvent


def note(n: int) -> NewEvent:
    return NewEvent(type="note", data={"n": n})


def _chattr(flag: str, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chattr", flag, *map(str, paths)], capture_output=True, text=True, check=False
    )


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths listed here are made immutable by the test and writable again at its end."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr on this machine: cannot make a file read-only for root")
    frozen: list[Path] = []
    yield frozen
    if frozen:
        _chattr("-i", *frozen)


def _freeze(immutable: list[Path], *paths: Path) -> None:
    done = _chattr("+i", *paths)
    if done.returncode != 0:
        pytest.skip(f"the file system under {paths[0]} has no immutable flag: {done.stderr}")
    immutable.extend(paths)
    for path in paths:
        probe = path / "probe" if path.is_dir() else path
        with pytest.raises(PermissionError):  # really read-only, for root too
            probe.open("ab").close()


async def _write_events(db: Path) -> None:
    store = await SQLiteEventStore.open(str(db))
    try:
        await store.append("agent.a1", [note(1), note(2)])
        await store.append("agent.a2", note(3))
    finally:
        await store.close()


@pytest.mark.parametrize("what", ["file", "file and directory"])
async def test_a_read_only_store_replays_and_refuses_appends_without_retry(
    tmp_path: Path, immutable: list[Path], what: str
) -> None:
    db = tmp_path / "ro" / "events.db"
    db.parent.mkdir()
    await _write_events(db)
    _freeze(immutable, *([db] if what == "file" else [db, db.parent]))
    store = await open_event_store(f"sqlite://{db}")
    try:
        assert isinstance(store, SQLiteEventStore) and store.read_only
        assert [e.data["n"] async for e in store.read("agent.a1")] == [1, 2]
        assert [e.data["n"] async for e in store.read_all()] == [1, 2, 3]
        filtered = store.read_all(filter=EventFilter(streams=("agent.a2",)))
        assert [e.data["n"] async for e in filtered] == [3]
        assert await store.head_position() == 3
        assert await store.stream_version("agent.a1") == 2
        with pytest.raises(ReadOnlyStoreError, match=r"events\.db.* is read-only \(") as caught:
            await store.append("agent.a1", note(4))
        assert not caught.value.retryable
        assert await store.head_position() == 3
    finally:
        await store.close()


async def test_a_store_that_cannot_be_created_in_a_read_only_directory_is_a_permanent_error(
    tmp_path: Path, immutable: list[Path]
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    _freeze(immutable, folder)
    with pytest.raises(
        StoreFileError,
        match=r"new\.db'.*unable to open database file \(SQLITE_CANTOPEN\); check that the dir",
    ) as caught:
        await open_event_store(f"sqlite://{folder / 'new.db'}")
    assert not caught.value.retryable
