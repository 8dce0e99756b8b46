"""A SQLite read model that cannot take writes (disk full) is an outage, not a poison event: the
runner waits at its checkpoint, dead-letters nothing, and resumes when writes work again."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from newfuse.eventstore import open_event_store
from newfuse.projections import Projection, ProjectionRunner, SQLiteBatch, SQLiteReadModel
from newfuse.projections.audit import audit_projection
from newfuse.schemas import NewEvent
from support import wait_for


@pytest.mark.faults
async def test_a_full_disk_makes_the_runner_wait_and_skips_nothing(tmp_path: Path) -> None:
    async with (
        await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store,
        await SQLiteReadModel.open(str(tmp_path / "model.db")) as model,
        ProjectionRunner(audit_projection(), store, model) as runner,
    ):
        first = await store.append(
            "agent.a", [NewEvent(type="note", data={"n": i}) for i in range(5)]
        )
        await runner.wait_until(first.last_position, timeout=10)
        [(pages,)] = await model.connection.execute_fetchall("PRAGMA page_count")
        await model.connection.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full

        big = [NewEvent(type="note", data={"n": i, "pad": "x" * 3000}) for i in range(5, 10)]
        second = await store.append("agent.a", big)

        async def waiting() -> bool:
            return runner.state == "waiting"

        await wait_for(waiting)
        assert runner.checkpoint == first.last_position
        assert await model.dead_letters("audit") == []

        await model.connection.execute("PRAGMA max_page_count = 1073741823")  # room again
        await runner.wait_until(second.last_position, timeout=30)
        rows = await model.connection.execute_fetchall("SELECT count(*) FROM audit_events")
        assert list(rows) == [(10,)]
        assert await model.dead_letters("audit") == []


@pytest.mark.faults
async def test_a_batch_cancelled_while_waiting_for_the_write_lock_leaves_no_open_transaction(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "model.db")
    async with await SQLiteReadModel.open(path, busy_timeout=5.0) as model:
        projection: Projection[SQLiteBatch] = Projection("p")
        generation = await model.prepare(projection)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

        async def one_batch() -> None:
            async with model.batch("p", generation, 0, active=True) as batch:
                batch.advance(1)

        begun: list[str] = []
        await model.connection.set_trace_callback(begun.append)  # runs as a statement starts
        task = asyncio.create_task(one_batch())

        async def waiting_for_lock() -> bool:
            return "BEGIN IMMEDIATE" in begun

        await wait_for(waiting_for_lock)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        other.execute("COMMIT")

        async def orphan_begin_ran() -> bool:
            return model.connection.in_transaction

        await wait_for(orphan_begin_ran)  # the cancelled BEGIN still ran on aiosqlite's thread
        async with model.batch("p", generation, 0, active=True) as batch:
            batch.advance(1)
        assert await model.checkpoint("p", generation) == 1
        assert not model.connection.in_transaction
        other.execute("BEGIN IMMEDIATE")  # and the lock is free for others again
        other.execute("COMMIT")
        other.close()
