"""Rebuild: replay into a fresh generation while the old one serves and a runner keeps going,
swap atomically, drop the old one. Readers reading all along never see a mix or a half-built
model."""

from __future__ import annotations

import asyncio
from pathlib import Path

from newfuse.eventstore import open_event_store
from newfuse.projections import (
    AuditIndex,
    Projection,
    ProjectionRunner,
    RebuildProgress,
    RedisBatch,
    RedisReadModel,
    SQLiteReadModel,
    audit_projection,
    rebuild,
)
from newfuse.schemas import NewEvent, RecordedEvent

READ_ALL = """
local generation = redis.call('GET', KEYS[1])
if not generation then return {} end
return {generation, redis.call('HGETALL', ARGV[1] .. generation .. ':m:streams')}
"""


def tagged() -> Projection[RedisBatch]:
    """Counts events per stream; each value carries the generation that wrote it."""
    projection: Projection[RedisBatch] = Projection("tagged")

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        batch.rpush(batch.key("applied"), event.position)
        batch.eval(
            "local v = redis.call('HGET', KEYS[1], ARGV[1]) "
            "local n = 0 if v then n = tonumber(string.match(v, ':(%d+)$')) end "
            "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (n + 1))",
            [batch.key("streams")],
            [event.stream, batch.generation],
        )

    return projection


async def test_rebuild_swaps_atomically_under_a_live_runner_and_continuous_readers(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    store = await open_event_store(f"sqlite://{tmp_path / 'events.db'}")
    model = await RedisReadModel.connect(redis_url, root=f"{prefix}:proj")
    for start in range(0, 3000, 100):
        await store.append(
            f"note.s{start % 7}", [NewEvent(type="note", data={}) for _ in range(100)]
        )
    runner = ProjectionRunner(tagged(), store, model, batch_size=50)
    seen: list[tuple[int, int]] = []  # (generation, total) per read
    mixed: list[list[str]] = []
    stop = asyncio.Event()

    async def read_continuously() -> None:
        while not stop.is_set():
            generation, flat = await model.read_active("tagged", READ_ALL)
            values = flat[1::2]
            if {value.split(":")[0] for value in values} - {generation}:
                mixed.append(values)
            seen.append((int(generation), sum(int(value.split(":")[1]) for value in values)))
            await asyncio.sleep(0)

    async def append_continuously() -> None:
        n = 0
        while not stop.is_set():
            await store.append(f"note.s{n % 7}", NewEvent(type="note", data={}))
            n += 1
            await asyncio.sleep(0.001)

    progress: list[RebuildProgress] = []
    try:
        async with runner:
            await runner.wait_until(await store.head_position(), timeout=30)
            old = await model.active_generation("tagged")
            reader = asyncio.create_task(read_continuously())
            writer = asyncio.create_task(append_continuously())
            result = await rebuild(tagged(), store, model, progress=progress.append, batch_size=97)
            stop.set()
            await asyncio.gather(reader, writer)
            head = await store.head_position()
            await runner.wait_until(head, timeout=30)
            assert runner.generation == result.new_generation
        assert old == result.old_generation and result.new_generation != old
        assert await model.active_generation("tagged") == result.new_generation
        assert mixed == []
        assert {generation for generation, _ in seen} == {old, result.new_generation}
        totals = [total for _, total in seen]
        assert totals == sorted(totals), "a read saw the model go back (a half-built generation)"
        assert progress[-1].swapped and progress[-1].position >= 3000
        assert [p.position for p in progress] == sorted(p.position for p in progress)
        leftovers = [
            key
            async for key in model.client.scan_iter(
                match=f"{model.generation_prefix('tagged', old)}*"
            )
        ]
        assert leftovers == []
        applied_key = model.model_prefix("tagged", result.new_generation) + "applied"
        applied = [int(p) for p in await model.client.lrange(applied_key, 0, -1)]  # type: ignore[misc]
        assert applied == list(range(1, head + 1))
    finally:
        await model.close()
        await store.close()


async def test_audit_rebuild_keeps_serving_the_old_index_until_the_new_one_is_complete(
    tmp_path: Path,
) -> None:
    store = await open_event_store(f"sqlite://{tmp_path / 'events.db'}")
    model = await SQLiteReadModel.open(str(tmp_path / "audit.db"))
    for start in range(0, 2000, 200):
        await store.append(
            f"note.s{start}", [NewEvent(type="note", data={"i": i}) for i in range(200)]
        )
    async with ProjectionRunner(audit_projection(), store, model) as runner:
        await runner.wait_until(2000, timeout=30)
    audit = await AuditIndex.open(str(tmp_path / "audit.db"))
    counts: list[int] = []
    stop = asyncio.Event()

    async def read_continuously() -> None:
        while not stop.is_set():
            result = await audit.sql("SELECT count(*), max(position) FROM audit_events")
            count, highest = result.rows[0]
            assert count == highest, "the index has a hole"
            counts.append(count)
            await asyncio.sleep(0)

    try:
        reader = asyncio.create_task(read_continuously())
        result = await rebuild(audit_projection(), store, model, batch_size=150)
        stop.set()
        await reader
        assert counts and min(counts) == 2000 and counts == sorted(counts)
        assert result.applied == 2000 and result.new_generation == 2
        [row] = (await audit.sql("SELECT count(*) FROM audit_events")).rows
        assert row == (2000,)
        tables = await audit.sql("SELECT name FROM sqlite_master WHERE name LIKE 'p_audit_g1_%'")
        assert tables.rows == []
    finally:
        await audit.close()
        await model.close()
        await store.close()
