"""The projection runner on real servers: batches with their checkpoint, skipping what is at or
below it, one application per event with two runners, poison events, status and lag.

Runs on both event stores (SQLite file, JetStream on the session's nats-server) and both read
models (Redis on the session's valkey, a SQLite file).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from newfuse.errors import (
    PartialBatchError,
    ProjectionStoppedError,
    ProjectionTimeoutError,
    UnknownProjectionError,
)
from newfuse.eventstore import EventStore, open_event_store
from newfuse.projections import (
    Projection,
    ProjectionRunner,
    RedisBatch,
    RedisReadModel,
    RetryPolicy,
    SQLiteBatch,
    SQLiteReadModel,
    projection_status,
)
from newfuse.schemas import NewEvent, RecordedEvent
from support import wait_for


@pytest.fixture(params=["sqlite", "jetstream"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, nats_url: str, prefix: str
) -> AsyncIterator[EventStore]:
    if request.param == "sqlite":
        opened = await open_event_store(f"sqlite://{tmp_path / 'events.db'}")
    else:
        opened = await open_event_store(nats_url, prefix=prefix)
    yield opened
    await opened.close()


@pytest.fixture
async def redis_model(redis_url: str, prefix: str) -> AsyncIterator[RedisReadModel]:
    model = await RedisReadModel.connect(redis_url, root=f"{prefix}:proj")
    yield model
    await model.close()


@pytest.fixture
async def sqlite_model(tmp_path: Path) -> AsyncIterator[SQLiteReadModel]:
    model = await SQLiteReadModel.open(str(tmp_path / "model.db"))
    yield model
    await model.close()


def note(n: int) -> NewEvent:
    return NewEvent(type="note", data={"n": n})


def redis_counter(name: str = "counts", **options: Any) -> Projection[RedisBatch]:
    """Appends each applied position to a list and sums `n` per stream."""
    projection: Projection[RedisBatch] = Projection(name, **options)

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        batch.rpush(batch.key("applied"), event.position)
        batch.hincrby(batch.key("sum"), event.stream, event.data["n"])

    return projection


async def applied(model: RedisReadModel, name: str = "counts") -> list[int]:
    generation = await model.active_generation(name)
    assert generation is not None
    key = model.model_prefix(name, generation) + "applied"
    return [int(value) for value in await model.client.lrange(key, 0, -1)]  # type: ignore[misc]


async def append_notes(store: EventStore, stream: str, numbers: range) -> list[int]:
    positions = []
    for start in range(numbers.start, numbers.stop, 50):
        chunk = range(start, min(start + 50, numbers.stop))
        result = await store.append(stream, [note(n) for n in chunk])
        positions += list(range(result.first_position, result.last_position + 1))
    return positions


async def test_runner_applies_every_event_once_in_order_with_its_checkpoint(
    store: EventStore, redis_model: RedisReadModel
) -> None:
    positions = await append_notes(store, "test.a", range(300))
    async with ProjectionRunner(redis_counter(), store, redis_model, batch_size=64) as runner:
        positions += await append_notes(store, "test.b", range(300, 420))
        await runner.wait_until(positions[-1], timeout=20)
        assert await applied(redis_model) == positions
        assert await redis_model.checkpoint("counts") == positions[-1] == runner.checkpoint
        generation = await redis_model.active_generation("counts")
        assert generation is not None
        sums = await redis_model.client.hgetall(  # type: ignore[misc]
            redis_model.model_prefix("counts", generation) + "sum"
        )
        assert sums == {"test.a": str(sum(range(300))), "test.b": str(sum(range(300, 420)))}


async def test_a_restarted_runner_skips_what_is_at_or_below_its_checkpoint(
    store: EventStore, redis_model: RedisReadModel
) -> None:
    first = await append_notes(store, "test.a", range(100))
    async with ProjectionRunner(redis_counter(), store, redis_model) as runner:
        await runner.wait_until(first[-1])
    second = await append_notes(store, "test.a", range(100, 150))
    async with ProjectionRunner(redis_counter(), store, redis_model, batch_size=7) as runner:
        await runner.wait_until(second[-1])
    assert await applied(redis_model) == first + second


async def test_two_runners_of_one_projection_still_apply_each_event_once(
    store: EventStore, redis_model: RedisReadModel
) -> None:
    positions = await append_notes(store, "test.a", range(400))
    one = ProjectionRunner(redis_counter(), store, redis_model, batch_size=5, linger=0)
    two = ProjectionRunner(redis_counter(), store, redis_model, batch_size=3, linger=0)
    async with one, two:
        positions += await append_notes(store, "test.b", range(100))

        async def done() -> bool:
            return await redis_model.checkpoint("counts") == positions[-1]

        await wait_for(done, timeout=30)
    assert await applied(redis_model) == positions


async def test_sqlite_read_model_applies_in_one_transaction_and_readers_use_the_view(
    store: EventStore, sqlite_model: SQLiteReadModel
) -> None:
    projection: Projection[SQLiteBatch] = Projection(
        "totals",
        setup=lambda batch: batch.execute(
            f"CREATE TABLE {batch.table('streams')} (stream TEXT PRIMARY KEY, total INTEGER, "
            "events INTEGER)"
        ),
    )

    @projection.on("note")
    async def _apply(event: RecordedEvent, batch: SQLiteBatch) -> None:
        await batch.execute(
            f"INSERT INTO {batch.table('streams')} VALUES (?, ?, 1) ON CONFLICT (stream) "
            "DO UPDATE SET total = total + excluded.total, events = events + 1",
            (event.stream, event.data["n"]),
        )

    positions = await append_notes(store, "test.a", range(120))
    async with ProjectionRunner(projection, store, sqlite_model, batch_size=50) as runner:
        positions += await append_notes(store, "test.b", range(30))
        await runner.wait_until(positions[-1])
    rows = await sqlite_model.connection.execute_fetchall(
        "SELECT stream, total, events FROM totals_streams ORDER BY stream"
    )
    assert [tuple(row) for row in rows] == [
        ("test.a", sum(range(120)), 120),
        ("test.b", sum(range(30)), 30),
    ]
    assert await sqlite_model.checkpoint("totals") == positions[-1]


def flaky_counter(fail: dict[int, int], **options: Any) -> Projection[RedisBatch]:
    """Like redis_counter, but the handler raises for note `n` as long as fail[n] > 0."""
    projection = redis_counter(**options)
    inner = projection.handlers["note"]

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        n = event.data["n"]
        if fail.get(n, 0) > 0:
            fail[n] -= 1
            raise RuntimeError(f"cannot apply note {n}")
        inner(event, batch)

    return projection


async def test_a_handler_that_fails_then_succeeds_is_retried_without_a_dead_letter(
    store: EventStore, redis_model: RedisReadModel
) -> None:
    positions = await append_notes(store, "test.a", range(20))
    failures = {7: 2}
    projection = flaky_counter(failures, retry=RetryPolicy(attempts=3, initial_delay=0.001))
    async with ProjectionRunner(projection, store, redis_model) as runner:
        await runner.wait_until(positions[-1])
    assert failures == {7: 0}
    assert await applied(redis_model) == positions
    assert await redis_model.dead_letters("counts") == []


async def test_a_poison_event_is_dead_lettered_and_skipped_and_shows_in_status(
    store: EventStore, redis_model: RedisReadModel
) -> None:
    positions = await append_notes(store, "test.a", range(20))
    projection = flaky_counter({5: 99}, retry=RetryPolicy(attempts=3, initial_delay=0.001))
    async with ProjectionRunner(projection, store, redis_model) as runner:
        await runner.wait_until(positions[-1])
        status = await projection_status("counts", store, redis_model, live=runner)
    assert await applied(redis_model) == positions[:5] + positions[6:]
    [letter] = await redis_model.dead_letters("counts")
    assert letter.position == positions[5] and letter.attempts == 3
    assert letter.event_type == "note" and "cannot apply note 5" in letter.error
    assert status.dead_letters == 1 and status.checkpoint == positions[-1]
    assert status.lag_events == 0 and status.state == "running"


async def test_a_projection_declared_stop_halts_before_a_poison_event(
    store: EventStore, redis_model: RedisReadModel
) -> None:
    positions = await append_notes(store, "test.a", range(20))
    projection = flaky_counter(
        {5: 99}, on_poison="stop", retry=RetryPolicy(attempts=2, initial_delay=0.001)
    )
    runner = ProjectionRunner(projection, store, redis_model)
    async with runner:
        with pytest.raises(ProjectionStoppedError, match="stopped at the 'note' event at position"):
            await runner.wait_until(positions[-1])
        status = await projection_status("counts", store, redis_model)
    assert await applied(redis_model) == positions[:5]
    assert status.state == "failed" and status.checkpoint == positions[4]
    assert (
        status.dead_letters == 1
        and status.lag_events == await store.head_position() - (positions[4])
    )
    assert status.last_error is not None and "cannot apply note 5" in status.last_error


async def test_status_shows_lag_before_the_runner_catches_up_and_none_after(
    store: EventStore, redis_model: RedisReadModel
) -> None:
    positions = await append_notes(store, "test.a", range(10))
    async with ProjectionRunner(redis_counter(), store, redis_model, stats_interval=0) as runner:
        await runner.wait_until(positions[-1])
    more = await append_notes(store, "test.a", range(10, 40))
    behind = await projection_status("counts", store, redis_model)
    assert behind.checkpoint == positions[-1] and behind.head == more[-1]
    assert behind.lag_events == len(more) and behind.lag_seconds >= 0
    assert behind.state == "stopped"
    async with ProjectionRunner(redis_counter(), store, redis_model) as runner:
        await runner.wait_until(more[-1])
        caught_up = await projection_status("counts", store, redis_model, live=runner)
    assert caught_up.lag_events == 0 and caught_up.lag_seconds == 0
    with pytest.raises(UnknownProjectionError, match="no projection named 'nope'"):
        await projection_status("nope", store, redis_model)


async def test_wait_until_names_the_projection_and_position_when_time_runs_out(
    store: EventStore, redis_model: RedisReadModel
) -> None:
    async with ProjectionRunner(redis_counter(), store, redis_model) as runner:
        with pytest.raises(ProjectionTimeoutError, match="'counts' did not reach position 99"):
            await runner.wait_until(99, timeout=0.2)


async def test_a_command_redis_refuses_inside_a_batch_stops_the_projection_naming_a_rebuild(
    redis_model: RedisReadModel, tmp_path: Path
) -> None:
    projection: Projection[RedisBatch] = Projection("refused")

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        batch.rpush(batch.key("applied"), event.position)
        if event.data["n"] == 2:
            batch.incrby(batch.key("applied"))  # WRONGTYPE at EXEC: Redis has no rollback

    async with await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store:
        for n in (1, 2, 3):
            await store.append("agent.a1", note(n))
        runner = ProjectionRunner(projection, store, redis_model)
        await runner.start()
        with pytest.raises(PartialBatchError, match=r"fuse projections rebuild refused"):
            await runner.wait_until(3, timeout=10)
        assert runner.state == "failed"
        assert runner.failure is not None and "WRONGTYPE" in runner.failure.reason
        status = await projection_status("refused", store, redis_model)
        assert status.state == "failed" and "rebuild" in (status.last_error or "")
        await runner.stop()  # the failure stays in runner.failure, as for poison events
