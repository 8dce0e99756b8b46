"""The built-in read models: agent state in Redis (stale StateUpdates ignored, lifecycle status)
and the audit index in SQLite (filters; raw SQL on a connection SQLite makes read-only)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from newfuse.errors import InvalidNameError, ReadOnlyQueryError
from newfuse.eventstore import EventStore, open_event_store
from newfuse.projections import (
    AgentStateView,
    AuditIndex,
    Projection,
    ProjectionRunner,
    RedisReadModel,
    SQLiteBatch,
    SQLiteReadModel,
    agent_state_projection,
    audit_projection,
)
from newfuse.schemas import A2AMessage, A2AMetadata, NewEvent, StateUpdate, TraceContext


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    opened = await open_event_store(f"sqlite://{tmp_path / 'events.db'}")
    yield opened
    await opened.close()


def update(agent: str, version: int, **state: object) -> NewEvent:
    return NewEvent(data=StateUpdate(agent_id=agent, state=dict(state), version=version))


async def test_agent_state_keeps_the_newest_version_and_ignores_older_updates(
    store: EventStore, redis_url: str, prefix: str
) -> None:
    model = await RedisReadModel.connect(redis_url, root=f"{prefix}:proj")
    view = AgentStateView(model)
    try:
        await store.append("agent.r1", NewEvent(type="agent.started", data={}))
        await store.append("agent.r1", [update("r1", 1, step="plan"), update("r1", 3, step="act")])
        await store.append("agent.r1", update("r1", 2, step="stale"))  # older: ignored
        await store.append("agent.r1", update("r1", 3, step="same version"))  # not newer
        last = await store.append("agent.r2", update("r2", 5, step="x"))
        async with ProjectionRunner(agent_state_projection(), store, model) as runner:
            await runner.wait_until(last.position)
            r1 = await view.get("r1")
            assert r1 is not None
            assert (r1.state, r1.version, r1.status) == ({"step": "act"}, 3, "running")
            assert r1.updated_at is not None and r1.position == 3
            stopped = await store.append("agent.r1", NewEvent(type="agent.stopped", data={}))
            newer = await store.append("agent.r1", update("r1", 4, step="done"))
            await runner.wait_until(max(stopped.position, newer.position))
        everyone = await view.agents()
        assert [(a.agent_id, a.version, a.state, a.status) for a in everyone] == [
            ("r1", 4, {"step": "done"}, "stopped"),
            ("r2", 5, {"step": "x"}, None),
        ]
        assert await view.get("nobody") is None
        assert await view.get("") is None
    finally:
        await model.close()


@contextlib.contextmanager
def local_time_zone(name: str) -> Iterator[None]:
    before = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


async def test_audit_index_answers_filters_and_refuses_writes_on_its_sql_connection(
    store: EventStore, tmp_path: Path
) -> None:
    path = str(tmp_path / "audit.db")
    model = await SQLiteReadModel.open(path)
    trace = TraceContext(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    hello = A2AMessage(type="hello", metadata=A2AMetadata(sender="alice"))
    first = await store.append(
        "conv.c1", NewEvent(data=hello, type="a2a.message", correlation_id="c1", trace=trace)
    )
    await store.append("note.n1", NewEvent(type="note", data={"n": 1}, correlation_id="c2"))
    await store.append(
        "note.n1",
        NewEvent(type="note", data={"n": 2}, metadata={"sender": "bob"}, causation_id=first.ids[0]),
    )
    last = await store.append("agent.alice", NewEvent(type="agent.started", data={}))
    async with ProjectionRunner(audit_projection(), store, model) as runner:
        await runner.wait_until(last.position)
    audit = await AuditIndex.open(path)
    try:
        everything = await audit.query()
        assert [record.position for record in everything] == [1, 2, 3, 4]
        [a2a] = await audit.query(type="a2a.message")
        assert a2a.sender == "alice" and a2a.correlation_id == "c1"
        assert a2a.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and a2a.event_id == first.ids[0]
        assert a2a.payload["metadata"]["sender"] == "alice"
        assert [r.position for r in await audit.query(agent="alice")] == [1, 4]
        assert [r.position for r in await audit.query(agent="bob")] == [3]
        assert [r.causation_id for r in await audit.query(stream="note.n1")] == [None, first.ids[0]]
        assert [r.position for r in await audit.query(correlation_id="c2")] == [2]
        assert [r.position for r in await audit.query(limit=2, newest_first=True)] == [4, 3]
        assert await audit.query(since=everything[-1].time + timedelta(seconds=1)) == []
        # A naive time is UTC (as the event store takes it), whatever the local time zone.
        naive_utc = (everything[0].time - timedelta(seconds=1)).replace(tzinfo=None)
        with local_time_zone("America/New_York"):
            assert len(await audit.query(since=naive_utc)) == 4
        assert len(await audit.query(until=everything[-1].time + timedelta(seconds=1))) == 4
        result = await audit.sql("SELECT type, count(*) FROM audit_events GROUP BY type ORDER BY 1")
        assert result.columns == ["type", "count(*)"]
        assert result.rows == [("a2a.message", 1), ("agent.started", 1), ("note", 2)]
        with pytest.raises(ReadOnlyQueryError, match="read-only"):
            await audit.sql("DELETE FROM p_audit_g1_events")
        with pytest.raises(ReadOnlyQueryError, match="read-only"):
            await audit.sql("CREATE TABLE sneaky (x)")
        outside = tmp_path / "outside.db"
        with pytest.raises(ReadOnlyQueryError, match="read-only"):
            await audit.sql(f"ATTACH DATABASE '{outside}' AS outside")
        assert not outside.exists()
        with pytest.raises(ReadOnlyQueryError, match="read-only"):
            await audit.sql("PRAGMA user_version = 7")
        info = await audit.sql("PRAGMA table_info(audit_events)")
        assert "payload" in [row[1] for row in info.rows]
        assert len(await audit.query()) == 4
    finally:
        await audit.close()
        await model.close()


async def test_sqlite_projections_whose_sql_names_collide_are_refused(tmp_path: Path) -> None:
    def with_table(name: str, base: str) -> Projection[SQLiteBatch]:
        async def setup(batch: SQLiteBatch) -> None:
            await batch.execute(f'CREATE TABLE "{batch.table(base)}" (x INTEGER)')

        return Projection(name, setup=setup)

    async with await SQLiteReadModel.open(str(tmp_path / "model.db")) as model:
        await model.prepare(with_table("agent", "state_log"))
        with pytest.raises(InvalidNameError, match=r"collide with table 'state_log' of projection"):
            await model.prepare(with_table("agent_state", "log"))
        await model.prepare(with_table("agent_state", "history"))  # a free name works
        views = await model.connection.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'view' ORDER BY name"
        )
        assert [row[0] for row in views] == ["agent_state_history", "agent_state_log"]


async def test_a_table_a_handler_creates_later_gets_its_view(tmp_path: Path) -> None:
    projection: Projection[SQLiteBatch] = Projection("lazy")

    @projection.on("note")
    async def _apply(event: Any, batch: SQLiteBatch) -> None:
        table = batch.table("rows")
        await batch.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (n INTEGER)')
        await batch.execute(f'INSERT INTO "{table}" VALUES (?)', (event.data["n"],))

    async with (
        await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store,
        await SQLiteReadModel.open(str(tmp_path / "model.db")) as model,
    ):
        notes = [NewEvent(type="note", data={"n": n}) for n in (1, 2)]
        result = await store.append("agent.a1", notes)
        async with ProjectionRunner(projection, store, model) as runner:
            await runner.wait_until(result.last_position, timeout=10)
        rows = await model.connection.execute_fetchall("SELECT n FROM lazy_rows ORDER BY n")
        assert [row[0] for row in rows] == [1, 2]
