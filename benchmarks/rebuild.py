"""Rebuild benchmark: `rebuild()` of agent_state and audit next to raw redis-py and aiosqlite.

Usage: `python benchmarks/rebuild.py [--quick]` (see benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import redis.asyncio as redis
from _harness import Sizes, emit, parser, progress, run_benchmark, run_id, sizes_of, timed, workdir
from _projections import (
    AUDIT_INDEXES,
    AUDIT_TABLE,
    REBUILD_BATCH,
    agent_of,
    audit_row,
    hset_fields,
    populate,
)

from newfuse.eventstore import EventStore, open_event_store
from newfuse.nats import NatsServer
from newfuse.nats.embedded import ValkeyServer
from newfuse.projections import (
    AgentStateView,
    RedisReadModel,
    SQLiteReadModel,
    agent_state_projection,
    audit_projection,
    rebuild,
)
from newfuse.schemas import StateUpdate

# -- agent state: rebuild vs pipelined HSET --------------------------------------------------------
#
# Ours: `rebuild(agent_state_projection(), store, model)` into a fresh key root each round, timed
# from the call to its return: a new generation, the whole log replayed with `read_all`, every
# StateUpdate through the projection's compare-and-set Lua script (a batch's calls go as one
# EVALSHA of its batched form) inside one WATCH/MULTI/EXEC per 1000 events with the checkpoint,
# then the swap and the drop of the (empty) old generation.
#
# Baseline "read_all + HSET" (the target's line): the same `read_all` of the same store, then per
# event a plain HSET of the same key with the same five fields and values (agent_id, version,
# state JSON, updated_at, position), and one SADD of the batch's agents to the same set, in a
# non-transactional redis-py pipeline sent every 1000 events. It pays the store read as we do,
# and none of our guarantees (no version check, no checkpoint, no atomic unit).
#
# Baseline "HSET only": the same pipeline fed from the events decoded in advance (read once
# before timing), i.e. the read model's write cost alone; it shows how much of our time the
# store read takes.


async def raw_hset(
    client: redis.Redis, root: str, source: Any, expected: int, *, from_store: bool
) -> int:
    """Pipelined HSET + SADD of every StateUpdate, one pipeline round trip per 1000 events."""
    pipe = client.pipeline(transaction=False)
    agents_key = f"{root}:agents"
    count = 0
    if from_store:

        async def events() -> Any:
            async for event in source:
                yield event.data, event.position

        items = events()
    else:

        async def listed() -> Any:
            for item in source:
                yield item

        items = listed()
    agents: set[str] = set()
    async for update, position in items:
        if not isinstance(update, StateUpdate):
            raise AssertionError(f"read gave {type(update).__name__}, not StateUpdate")
        pipe.hset(f"{root}:agent:{update.agent_id}", mapping=hset_fields(update, position))
        agents.add(update.agent_id)
        count += 1
        if count % REBUILD_BATCH == 0:
            pipe.sadd(agents_key, *agents)
            agents.clear()
            await pipe.execute()
    if agents:
        pipe.sadd(agents_key, *agents)
    await pipe.execute()
    if count != expected:
        raise AssertionError(f"raw HSET wrote {count} events, {expected} are in the store")
    return count


async def ours_agent_rebuild(
    store: EventStore, redis_url: str, expected: int, agents: int, per_agent: int
) -> int:
    model = await RedisReadModel.connect(redis_url, root=f"bench:{run_id()}")
    try:
        result = await rebuild(agent_state_projection(), store, model, batch_size=REBUILD_BATCH)
        if result.applied != expected:
            raise AssertionError(f"rebuild applied {result.applied} of {expected} events")
        state = await AgentStateView(model).get(agent_of(agents - 1))
        if state is None or state.version != per_agent:
            raise AssertionError(f"rebuilt agent state is wrong: {state}")
        return result.applied
    finally:
        await model.close()


async def bench_agent_rebuild(
    label: str, store: EventStore, redis_url: str, sizes: Sizes, total: int
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    per_agent = total // sizes.rebuild_agents
    try:
        progress(
            f"{label} agent_state rebuild: {total:,} events over {sizes.rebuild_agents} agents"
        )
        decoded = [(event.data, event.position) async for event in store.read_all()]
        sides: dict[str, Callable[[], Awaitable[int]]] = {
            "ours": lambda: ours_agent_rebuild(
                store, redis_url, total, sizes.rebuild_agents, per_agent
            ),
            "read_all_hset": lambda: raw_hset(
                client, f"raw:{run_id()}", store.read_all(), total, from_store=True
            ),
            "hset_only": lambda: raw_hset(
                client, f"raw:{run_id()}", decoded, total, from_store=False
            ),
        }
        best = dict.fromkeys(sides, 0.0)
        for side in sides.values():  # warm-up
            await side()
            await client.flushdb()
        for round_no in range(sizes.rounds):
            for key, side in sides.items():
                count, seconds = await timed(side)
                best[key] = max(best[key], count / seconds)
                progress(f"  round {round_no + 1} {key}: {count / seconds:,.0f} events/s")
                await client.flushdb()
    finally:
        await client.aclose()
    emit(
        f"{label}.agent_state.rebuild",
        best["ours"],
        best["read_all_hset"],
        "events/s (rebuild() of the agent_state model from the whole log; baseline: the same "
        "read_all plus redis-py pipelined HSET+SADD of the same keys and fields, 1000 per "
        "round trip)",
        n=total,
        lower_is_better=False,
    )
    emit(
        f"{label}.agent_state.rebuild.vs_hset_only",
        best["ours"],
        best["hset_only"],
        "events/s (the same rebuild; baseline: the same pipelined HSET+SADD fed from events "
        "decoded in advance, no store read)",
        n=total,
        lower_is_better=False,
    )


# -- audit index: rebuild vs executemany -----------------------------------------------------------
#
# Ours: `rebuild(audit_projection(), store, model)` into a fresh SQLite file each round (WAL,
# synchronous=FULL): the table and its seven indexes, one row per event, one transaction per 1000
# events with the checkpoint, then the swap (views) and the drop of the old generation.
#
# Baseline: raw aiosqlite on a fresh file with the same pragmas, the same table and the same
# indexes, the same 13 column values per event (derived from the same read events by the script,
# not by our code), `executemany` of 1000 rows inside BEGIN IMMEDIATE ... COMMIT. As above, one
# baseline also pays the `read_all`, the other is fed from events read in advance.


async def raw_executemany(path: Path, source: Any, expected: int, *, from_store: bool) -> int:
    connection = await aiosqlite.connect(path, isolation_level=None)
    try:
        await connection.execute("PRAGMA journal_mode = WAL")
        await connection.execute("PRAGMA synchronous = FULL")
        await connection.execute(AUDIT_TABLE)
        for suffix, columns in AUDIT_INDEXES:
            await connection.execute(f"CREATE INDEX events_{suffix} ON events ({columns})")
        insert = "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
        count = 0
        rows: list[tuple[Any, ...]] = []

        async def flush() -> None:
            await connection.execute("BEGIN IMMEDIATE")
            await connection.executemany(insert, rows)
            await connection.commit()
            rows.clear()

        if from_store:
            async for event in source:
                rows.append(audit_row(event))
                count += 1
                if len(rows) >= REBUILD_BATCH:
                    await flush()
        else:
            for event in source:
                rows.append(audit_row(event))
                count += 1
                if len(rows) >= REBUILD_BATCH:
                    await flush()
        if rows:
            await flush()
    finally:
        await connection.close()
    if count != expected:
        raise AssertionError(f"raw executemany wrote {count} rows, {expected} are in the store")
    return count


async def ours_audit_rebuild(store: EventStore, path: Path, expected: int) -> int:
    model = await SQLiteReadModel.open(str(path))
    try:
        result = await rebuild(audit_projection(), store, model, batch_size=REBUILD_BATCH)
        if result.applied != expected:
            raise AssertionError(f"audit rebuild applied {result.applied} of {expected} events")
        rows = list(await model.connection.execute_fetchall("SELECT count(*) FROM audit_events"))
        if rows[0][0] != expected:
            raise AssertionError(f"audit index holds {rows[0][0]} rows, not {expected}")
        return result.applied
    finally:
        await model.close()


async def bench_audit_rebuild(
    label: str, store: EventStore, workdir: Path, sizes: Sizes, total: int
) -> None:
    progress(f"{label} audit rebuild: {total:,} events")
    events = [event async for event in store.read_all()]
    directory = workdir / f"{label}-audit"
    await asyncio.to_thread(directory.mkdir)
    counter = 0

    def fresh(side: str) -> Path:
        nonlocal counter
        counter += 1
        return directory / f"{side}-{counter}.db"

    sides: dict[str, Callable[[], Awaitable[int]]] = {
        "ours": lambda: ours_audit_rebuild(store, fresh("ours"), total),
        "read_all_executemany": lambda: raw_executemany(
            fresh("raw"), store.read_all(), total, from_store=True
        ),
        "executemany_only": lambda: raw_executemany(fresh("raw"), events, total, from_store=False),
    }
    best = dict.fromkeys(sides, 0.0)
    for side in sides.values():  # warm-up
        await side()
    for round_no in range(sizes.rounds):
        for key, side in sides.items():
            count, seconds = await timed(side)
            best[key] = max(best[key], count / seconds)
            progress(f"  round {round_no + 1} {key}: {count / seconds:,.0f} events/s")
    await asyncio.to_thread(shutil.rmtree, directory, True)
    emit(
        f"{label}.audit.rebuild",
        best["ours"],
        best["read_all_executemany"],
        "events/s (rebuild() of the audit index from the whole log, WAL, synchronous=FULL; "
        "baseline: the same read_all plus aiosqlite executemany of the same rows into the same "
        "table and indexes, 1000 per transaction)",
        n=total,
        lower_is_better=False,
    )
    emit(
        f"{label}.audit.rebuild.vs_executemany_only",
        best["ours"],
        best["executemany_only"],
        "events/s (the same rebuild; baseline: the same executemany fed from events read in "
        "advance, no store read)",
        n=total,
        lower_is_better=False,
    )


async def main(sizes: Sizes) -> None:
    async with (
        workdir("rebuild") as path,
        NatsServer(data_dir=path / "nats") as server,
        ValkeyServer(data_dir=path / "valkey") as valkey,
    ):
        progress(f"nats-server at {server.url}, valkey at {valkey.url}, files in {path}")
        store = await open_event_store(server.url, prefix=f"bp{run_id()}")
        try:
            progress(f"jetstream: populating {sizes.rebuild_events:,} events (batched appends)")
            head = await populate(store, sizes.rebuild_events, sizes.rebuild_agents)
            await bench_agent_rebuild("jetstream", store, valkey.url, sizes, head)
            await bench_audit_rebuild("jetstream", store, path, sizes, head)
        finally:
            await store.close()
        store = await open_event_store(f"sqlite://{path / 'store.db'}")
        try:
            progress(f"sqlite: populating {sizes.rebuild_sqlite_events:,} events (batched appends)")
            head = await populate(store, sizes.rebuild_sqlite_events, sizes.rebuild_agents)
            await bench_agent_rebuild("sqlite", store, valkey.url, sizes, head)
            await bench_audit_rebuild("sqlite", store, path, sizes, head)
        finally:
            await store.close()


if __name__ == "__main__":
    run_benchmark(main(sizes_of(parser(__doc__).parse_args())))
