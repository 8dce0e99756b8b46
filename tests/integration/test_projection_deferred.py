"""Deferred SQLite writes (`SQLiteBatch.defer`): one executemany per batch, reads see them, and a
row SQLite refuses is traced back to its own event, dead-lettered, and nothing else is lost.

Runs on a SQLite event store and a SQLite read model (both real files).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from newfuse.eventstore import EventStore, open_event_store
from newfuse.projections import (
    Projection,
    ProjectionRunner,
    RetryPolicy,
    SQLiteBatch,
    SQLiteReadModel,
    rebuild,
)
from newfuse.schemas import NewEvent, RecordedEvent


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    opened = await open_event_store(f"sqlite://{tmp_path / 'events.db'}")
    yield opened
    await opened.close()


@pytest.fixture
async def model(tmp_path: Path) -> AsyncIterator[SQLiteReadModel]:
    opened = await SQLiteReadModel.open(str(tmp_path / "model.db"))
    yield opened
    await opened.close()


async def _setup(batch: SQLiteBatch) -> None:
    # `n` is unique: a second note with the same n is refused by SQLite at the flush.
    await batch.execute(
        f'CREATE TABLE "{batch.table("notes")}" (position INTEGER PRIMARY KEY, n INTEGER UNIQUE)'
    )


def deferred_notes() -> tuple[Projection[SQLiteBatch], list[int]]:
    """Defers one row per note; every tenth note also counts the rows (a read, which flushes)
    and keeps the count in the list returned with the projection."""
    projection: Projection[SQLiteBatch] = Projection(
        "notes", setup=_setup, retry=RetryPolicy(attempts=2, initial_delay=0.001)
    )
    seen: list[int] = []

    @projection.on("note")
    async def _apply(event: RecordedEvent, batch: SQLiteBatch) -> None:
        table = batch.table("notes")
        batch.defer(f'INSERT INTO "{table}" VALUES (?, ?)', (event.position, event.data["n"]))
        if event.data["n"] % 10 == 9:
            [(count,)] = await batch.fetchall(f'SELECT count(*) FROM "{table}"')
            seen.append(count)

    return projection, seen


async def append_numbers(store: EventStore, numbers: list[int]) -> list[int]:
    result = await store.append("test.a", [NewEvent(type="note", data={"n": n}) for n in numbers])
    return list(range(result.first_position, result.last_position + 1))


async def rows(model: SQLiteReadModel) -> list[tuple[int, int]]:
    return [
        (int(position), int(n))
        for position, n in await model.connection.execute_fetchall(
            "SELECT position, n FROM notes_notes ORDER BY position"
        )
    ]


async def test_deferred_rows_are_written_with_the_checkpoint_and_visible_to_reads_in_the_batch(
    store: EventStore, model: SQLiteReadModel
) -> None:
    positions = await append_numbers(store, list(range(40)))
    projection, seen = deferred_notes()
    async with ProjectionRunner(projection, store, model, batch_size=100, linger=0.05) as runner:
        await runner.wait_until(positions[-1])
    assert await rows(model) == list(zip(positions, range(40), strict=True))
    assert await model.checkpoint("notes") == positions[-1]
    # Each tenth note counted the rows before it, its own deferred one included.
    assert seen == [10, 20, 30, 40]


async def test_a_refused_deferred_row_dead_letters_its_own_event_and_keeps_the_others(
    store: EventStore, model: SQLiteReadModel
) -> None:
    numbers = [*range(25), 3, *range(100, 120)]  # the 26th event repeats n=3
    positions = await append_numbers(store, numbers)
    async with ProjectionRunner(deferred_notes()[0], store, model, batch_size=100) as runner:
        await runner.wait_until(positions[-1])
    poison = positions[25]
    expected = [(p, n) for p, n in zip(positions, numbers, strict=True) if p != poison]
    assert await rows(model) == expected
    [letter] = await model.dead_letters("notes")
    assert letter.position == poison and letter.attempts == 2
    assert "IntegrityError" in letter.error and "UNIQUE" in letter.error
    assert await model.checkpoint("notes") == positions[-1]


async def test_rebuild_with_deferred_rows_equals_the_runner_model(
    store: EventStore, model: SQLiteReadModel
) -> None:
    numbers = [*range(30), 7, *range(50, 60)]
    positions = await append_numbers(store, numbers)
    async with ProjectionRunner(deferred_notes()[0], store, model) as runner:
        await runner.wait_until(positions[-1])
    before = await rows(model)
    result = await rebuild(deferred_notes()[0], store, model, batch_size=16)
    assert result.applied == len(numbers) - 1 and result.dead_letters == 1
    assert await rows(model) == before
    assert [letter.position for letter in await model.dead_letters("notes")] == [positions[30]]
