"""Projections benchmark: rebuilds and steady-state lag, side by side with raw redis-py/aiosqlite.

One run starts one embedded nats-server and one embedded valkey and puts SQLite files in a temp
directory. Every measurement runs our code and its baseline on the same servers, on the same
events, after a warm-up, in alternating rounds (the best round of each side is kept). Progress
goes to stderr; results go to stdout as JSON lines with the keys name, ours, baseline, unit,
ratio and n, where ratio is ours / baseline for throughput and baseline / ours for latency (so
higher is always better).

Usage: `python benchmarks/projections.py [--quick]` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec
import nats
import redis.asyncio as redis
from _harness import emit, percentile, progress, run_benchmark, run_id, timed
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from newfuse.errors import ProjectionTimeoutError
from newfuse.eventstore import NO_STREAM, EventStore, open_event_store
from newfuse.nats import NatsServer
from newfuse.nats.embedded import ValkeyServer
from newfuse.projections import (
    AgentStateView,
    ProjectionRunner,
    RedisReadModel,
    SQLiteReadModel,
    agent_state_projection,
    audit_projection,
    rebuild,
)
from newfuse.schemas import Envelope, NewEvent, RecordedEvent, StateUpdate

SCRIPT = str(Path(__file__).resolve())

# -- sizes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much each phase does; `--quick` is a smoke run of a few seconds."""

    events: int  # StateUpdate events in the JetStream log that the rebuilds replay
    agents: int  # agents (one stream `agent.<id>` each) those events are spread over
    sqlite_events: int  # the same, in a SQLite event store (the cheaper second figure)
    lag_rate: int  # events/s appended during the lag phase
    lag_seconds: float  # measured seconds of load per side
    lag_warmup: float  # seconds of load before sampling starts
    rounds: int  # measured rounds per side (after one warm-up)


FULL = Sizes(
    events=200_000,
    agents=1_000,
    sqlite_events=200_000,
    lag_rate=5_000,
    lag_seconds=10.0,
    lag_warmup=1.0,
    rounds=3,
)
QUICK = Sizes(
    events=4_000,
    agents=40,
    sqlite_events=2_000,
    lag_rate=5_000,
    lag_seconds=2.0,
    lag_warmup=0.3,
    rounds=1,
)

REBUILD_BATCH = 1000
"""Events per atomic unit in `rebuild` (its default) and per pipeline/transaction in the
baselines, so both sides make the same number of round trips to the read model."""

# -- output ----------------------------------------------------------------------------------------


# -- the events ------------------------------------------------------------------------------------


def agent_of(stream_index: int) -> str:
    return f"bench-{stream_index}"


def new_event(agent: str, version: int) -> NewEvent:
    """A typed StateUpdate of about 200 bytes; `version` is the event's version in its stream,
    so every update is newer than the stored one and the agent-state script always writes."""
    return NewEvent(
        data=StateUpdate(
            agent_id=agent,
            state={"step": "plan", "turn": version, "note": "n" * 100},
            version=version,
        ),
        correlation_id=f"conv-{version % 100}",
    )


async def populate(store: EventStore, total: int, agents: int) -> int:
    """Append `total` StateUpdates, one stream `agent.bench-<k>` per agent, in batched appends
    (up to 500 events per append, 8 appenders in flight); returns the head position."""
    per = total // agents
    batch = min(per, 500)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(agents):
        queue.put_nowait(index)
    done = 0
    next_report = time.monotonic() + 5

    async def worker() -> None:
        nonlocal done, next_report
        while not queue.empty():
            index = queue.get_nowait()
            agent = agent_of(index)
            written = 0
            while written < per:
                chunk = [
                    new_event(agent, written + i + 1) for i in range(min(batch, per - written))
                ]
                await store.append(f"agent.{agent}", chunk, written if written else NO_STREAM)
                written += len(chunk)
                done += len(chunk)
            if time.monotonic() > next_report:
                progress(f"  populated {done:,}/{total:,}")
                next_report = time.monotonic() + 5

    await asyncio.gather(*(worker() for _ in range(8)))
    return await store.head_position()


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


def _hset_fields(update: StateUpdate, position: int) -> dict[str, Any]:
    return {
        "agent_id": update.agent_id,
        "version": update.version,
        "state": msgspec.json.encode(update.state).decode(),
        "updated_at": update.timestamp.isoformat(),
        "position": position,
    }


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
        pipe.hset(f"{root}:agent:{update.agent_id}", mapping=_hset_fields(update, position))
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
    per_agent = total // sizes.agents
    try:
        progress(f"{label} agent_state rebuild: {total:,} events over {sizes.agents} agents")
        decoded = [(event.data, event.position) async for event in store.read_all()]
        sides: dict[str, Callable[[], Awaitable[int]]] = {
            "ours": lambda: ours_agent_rebuild(store, redis_url, total, sizes.agents, per_agent),
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

_AUDIT_TABLE = (
    "CREATE TABLE events (position INTEGER PRIMARY KEY, time TEXT NOT NULL, "
    "stream TEXT NOT NULL, category TEXT NOT NULL, type TEXT NOT NULL, "
    "schema_version INTEGER NOT NULL, event_id TEXT NOT NULL, sender TEXT, agent TEXT, "
    "correlation_id TEXT, causation_id TEXT, trace_id TEXT, payload TEXT NOT NULL)"
)
_AUDIT_INDEXES = (
    ("time", "time"),
    ("stream", "stream, position"),
    ("type", "type, position"),
    ("sender", "sender, position"),
    ("agent", "agent, position"),
    ("correlation", "correlation_id, position"),
    ("trace", "trace_id"),
)


def audit_row(event: RecordedEvent) -> tuple[Any, ...]:
    """The 13 values the audit index stores for an event (these events have no sender/trace)."""
    envelope: Envelope = event.envelope
    category, _, ident = envelope.stream.partition(".")
    return (
        event.position,
        envelope.timestamp.astimezone(UTC).replace(tzinfo=None).isoformat("T", "microseconds")
        + "Z",
        envelope.stream,
        category,
        envelope.type,
        envelope.schema_version,
        envelope.id,
        envelope.metadata.get("sender"),
        ident if category == "agent" else envelope.metadata.get("sender"),
        envelope.correlation_id,
        envelope.causation_id,
        None,
        bytes(envelope.data).decode(),
    )


async def raw_executemany(path: Path, source: Any, expected: int, *, from_store: bool) -> int:
    connection = await aiosqlite.connect(path, isolation_level=None)
    try:
        await connection.execute("PRAGMA journal_mode = WAL")
        await connection.execute("PRAGMA synchronous = FULL")
        await connection.execute(_AUDIT_TABLE)
        for suffix, columns in _AUDIT_INDEXES:
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


# -- steady-state lag ------------------------------------------------------------------------------
#
# A load generator in a child process (as writers are, next to a projection service) appends
# single-event StateUpdates through our store at a steady rate: a pacer releases the events that
# are due every millisecond to 64 appender tasks, over 200 streams. It keeps the ack time of each
# append made after the warm-up with the event's position, and hands them over when it is done.
# In this process, a monitor per projection records (checkpoint, time) at every move of the
# committed checkpoint (`wait_until`, which wakes on every move). Lag of an event = the first
# time its projection's checkpoint was at or past its position minus its ack time (0 when the
# event was applied before its ack reached the appender). Both processes read time.monotonic(),
# CLOCK_MONOTONIC, one clock for the whole machine.
#
# Ours: a ProjectionRunner of agent_state (Redis) and one of audit (SQLite) running together,
# defaults (batch_size 500, linger 2 ms). Baseline: the least a projector can do on the same
# servers: per model, a nats-py ordered push consumer on the same subjects and a writer that takes
# what has arrived and writes it (pipelined HSET+SADD; executemany in one transaction), then moves
# its in-memory checkpoint. Each round uses a fresh, empty store prefix.


class _Progress:
    """A checkpoint and a wake-up on every move (what the baseline exposes like wait_until)."""

    def __init__(self) -> None:
        self.checkpoint = 0
        self._moved = asyncio.Event()

    def advance(self, position: int) -> None:
        self.checkpoint = position
        self._moved.set()
        self._moved = asyncio.Event()

    async def wait_until(self, position: int, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.checkpoint < position:
                    await self._moved.wait()
        return self.checkpoint


class RawProjector:
    """The baseline projectors: an ordered push consumer each -> pipelined HSET / executemany."""

    def __init__(self, nc: NatsClient, prefix: str, redis_url: str, sqlite_path: Path) -> None:
        self.nc = nc
        self.prefix = prefix
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.sqlite_path = sqlite_path
        self.redis_progress = _Progress()
        self.sqlite_progress = _Progress()
        self._for_redis: list[tuple[StateUpdate, int]] = []
        self._for_sqlite: list[tuple[Any, ...]] = []
        self._arrived = (asyncio.Event(), asyncio.Event())
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self._connection: aiosqlite.Connection | None = None
        self._decoder = msgspec.json.Decoder(Envelope)
        self._payload = msgspec.json.Decoder(StateUpdate)

    async def start(self) -> None:
        self._connection = await aiosqlite.connect(self.sqlite_path, isolation_level=None)
        await self._connection.execute("PRAGMA journal_mode = WAL")
        await self._connection.execute("PRAGMA synchronous = FULL")
        await self._connection.execute(_AUDIT_TABLE)
        for suffix, columns in _AUDIT_INDEXES:
            await self._connection.execute(f"CREATE INDEX events_{suffix} ON events ({columns})")
        self._tasks = [
            asyncio.create_task(self._redis_writer()),
            asyncio.create_task(self._sqlite_writer()),
        ]
        # One consumer per projection, as each of our runners has its own subscription.
        js = self.nc.jetstream()
        self._subs = [
            await js.subscribe(f"{self.prefix}.ev.>", ordered_consumer=True, cb=callback)
            for callback in (self._on_redis_message, self._on_sqlite_message)
        ]

    async def _on_redis_message(self, msg: Msg) -> None:
        envelope = self._decoder.decode(msg.data)
        update = self._payload.decode(envelope.data)
        self._for_redis.append((update, msg.metadata.sequence.stream))
        self._arrived[0].set()

    async def _on_sqlite_message(self, msg: Msg) -> None:
        envelope = self._decoder.decode(msg.data)
        position = msg.metadata.sequence.stream
        update = self._payload.decode(envelope.data)
        self._for_sqlite.append(
            audit_row(RecordedEvent(position=position, envelope=envelope, data=update))
        )
        self._arrived[1].set()

    async def _redis_writer(self) -> None:
        arrived = self._arrived[0]
        while True:
            await arrived.wait()
            arrived.clear()
            items, self._for_redis = self._for_redis, []
            if not items:
                continue
            pipe = self.client.pipeline(transaction=False)
            for update, position in items:
                pipe.hset(f"rawlag:agent:{update.agent_id}", mapping=_hset_fields(update, position))
            pipe.sadd("rawlag:agents", *{update.agent_id for update, _ in items})
            await pipe.execute()
            self.redis_progress.advance(items[-1][1])

    async def _sqlite_writer(self) -> None:
        arrived = self._arrived[1]
        assert self._connection is not None
        while True:
            await arrived.wait()
            arrived.clear()
            rows, self._for_sqlite = self._for_sqlite, []
            if not rows:
                continue
            await self._connection.execute("BEGIN IMMEDIATE")
            await self._connection.executemany(
                "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
            )
            await self._connection.commit()
            self.sqlite_progress.advance(rows[-1][0])

    async def close(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.client.delete("rawlag:agents")
        await self.client.aclose()
        if self._connection is not None:
            await self._connection.close()


class Monitor:
    """Records (checkpoint, time) at every move of one projection's committed checkpoint."""

    def __init__(self, name: str, wait_until: Callable[[int, float], Awaitable[int]]) -> None:
        self.name = name
        self.wait_until = wait_until
        self.moves: list[tuple[int, float]] = []
        self._recorded = asyncio.Event()

    async def run(self) -> None:
        checkpoint = 0
        while True:
            with contextlib.suppress(ProjectionTimeoutError):
                checkpoint = await self.wait_until(checkpoint + 1, 1.0)
            if not self.moves or checkpoint > self.moves[-1][0]:
                self.moves.append((checkpoint, time.monotonic()))
                self._recorded.set()
                self._recorded = asyncio.Event()

    async def reached(self, position: int, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until a recorded move is at or past `position`."""
        async with asyncio.timeout(timeout):
            while not self.moves or self.moves[-1][0] < position:
                await self._recorded.wait()

    def lags(self, acks: list[tuple[int, float]]) -> list[float]:
        """Seconds from each ack to the first checkpoint at or past its position, ascending."""
        checkpoints = [checkpoint for checkpoint, _ in self.moves]
        samples = []
        for position, acked in acks:
            index = bisect.bisect_left(checkpoints, position)
            if index == len(checkpoints):
                raise AssertionError(f"{self.name} never applied position {position}")
            samples.append(max(self.moves[index][1] - acked, 0.0))
        return sorted(samples)


async def load(store: EventStore, rate: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Append single events at `rate`/s for warmup+seconds (the child's job).

    Returns:
        `acks`: (position, monotonic ack time) of every append after the warm-up, and `rate`:
        the append rate achieved over that part (acks / seconds until the last one).
    """
    streams = 200
    due: asyncio.Queue[int | None] = asyncio.Queue()
    acks: list[tuple[int, float]] = []
    start = time.monotonic()
    sample_from = start + warmup
    end = sample_from + seconds

    async def appender() -> None:
        while (j := await due.get()) is not None:
            k = j % streams
            result = await store.append(f"agent.lag-{k}", new_event(f"lag-{k}", j + 1))
            acked = time.monotonic()
            if acked >= sample_from:
                acks.append((result.position, acked))

    workers = [asyncio.create_task(appender()) for _ in range(64)]
    released = 0
    while (now := time.monotonic()) < end:
        target = int((now - start) * rate)
        while released < target:
            due.put_nowait(released)
            released += 1
        await asyncio.sleep(0.001)
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    return {"acks": acks, "rate": len(acks) / (time.monotonic() - sample_from)}


async def child_load(url: str, prefix: str, rate: int, seconds: float, warmup: float) -> None:
    """Child process: run the load on the store at `url`/`prefix`, print its report as JSON."""
    store = await open_event_store(url, prefix=prefix)
    try:
        report = await load(store, rate, seconds, warmup)
    finally:
        await store.close()
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


async def run_child_load(url: str, prefix: str, sizes: Sizes) -> dict[str, Any]:
    argv = [
        *(sys.executable, SCRIPT, "--child-load", url),
        *("--prefix", prefix, "--rate", str(sizes.lag_rate)),
        *("--seconds", str(sizes.lag_seconds), "--warmup", str(sizes.lag_warmup)),
    ]
    child = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(sizes.lag_seconds * 10 + 60):
            out, err = await child.communicate()
    except BaseException:
        if child.returncode is None:
            child.kill()
            await child.wait()
        raise
    if child.returncode != 0:
        raise RuntimeError(f"load child failed ({child.returncode}):\n{err.decode()}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


async def lag_round(
    side: str, url: str, nc: NatsClient, redis_url: str, workdir: Path, sizes: Sizes
) -> tuple[dict[str, list[float]], float]:
    prefix = f"bl{run_id()}"
    store = await open_event_store(url, prefix=prefix)  # provisions the stream for both sides
    monitors: list[Monitor] = []
    runners: list[ProjectionRunner[Any]] = []
    models: list[Any] = []
    raw: RawProjector | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if side == "ours":
            redis_model = await RedisReadModel.connect(redis_url, root=f"lag:{run_id()}")
            sqlite_model = await SQLiteReadModel.open(str(workdir / f"lag-ours-{prefix}.db"))
            models = [redis_model, sqlite_model]
            runners = [
                ProjectionRunner(agent_state_projection(), store, redis_model),
                ProjectionRunner(audit_projection(), store, sqlite_model),
            ]
            for runner in runners:
                await runner.start()
                monitors.append(Monitor(runner.name, runner.wait_until))
        else:
            raw = RawProjector(nc, prefix, redis_url, workdir / f"lag-raw-{prefix}.db")
            await raw.start()
            monitors = [
                Monitor("agent_state", raw.redis_progress.wait_until),
                Monitor("audit", raw.sqlite_progress.wait_until),
            ]
        tasks = [asyncio.create_task(monitor.run()) for monitor in monitors]
        report = await run_child_load(url, prefix, sizes)
        acks = [(int(position), float(acked)) for position, acked in report["acks"]]
        last = max(position for position, _ in acks)
        for monitor in monitors:
            await monitor.reached(last, 120.0)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in runners:
            await runner.stop()
        if raw is not None:
            await raw.close()
        for model in models:
            await model.close()
        await store.close()
    return {monitor.name: monitor.lags(acks) for monitor in monitors}, float(report["rate"])


async def bench_lag(url: str, nc: NatsClient, redis_url: str, workdir: Path, sizes: Sizes) -> None:
    progress(
        f"lag: {sizes.lag_rate:,} single-event appends/s from a child process for "
        f"{sizes.lag_seconds:g} s per side (+{sizes.lag_warmup:g} s warm-up), agent_state and "
        "audit projections together"
    )
    samples: dict[str, dict[str, list[float]]] = {"ours": {}, "raw": {}}
    rates: dict[str, float] = {}
    for side in ("ours", "raw"):
        results, rate = await lag_round(side, url, nc, redis_url, workdir, sizes)
        rates[side] = rate
        for name, values in results.items():
            samples[side][name] = values
            progress(
                f"  {side} {name}: {len(values):,} samples at {rate:,.0f} appends/s, "
                f"p50 {percentile(values, 0.5) * 1000:.2f} ms, "
                f"p99 {percentile(values, 0.99) * 1000:.2f} ms"
            )
    for name in ("agent_state", "audit"):
        ours, raw = samples["ours"][name], samples["raw"][name]
        for label, fraction in (("p50", 0.50), ("p99", 0.99)):
            emit(
                f"{name}.lag.{label}",
                percentile(ours, fraction) * 1000,
                percentile(raw, fraction) * 1000,
                f"ms from append ack to the committed checkpoint passing the event, under "
                f"{sizes.lag_rate:,} single-event appends/s from another process (ours: "
                "ProjectionRunner; baseline: ordered push consumer + pipelined HSET / "
                "executemany, no checkpoint; ratio = baseline/ours)",
                n=len(ours),
                lower_is_better=True,
                rate=round(rates["ours"], 1),
                baseline_rate=round(rates["raw"], 1),
            )


# -- main ------------------------------------------------------------------------------------------


async def main(sizes: Sizes) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="newfuse-bench-proj-"))
    try:
        async with (
            NatsServer(data_dir=workdir / "nats") as server,
            ValkeyServer(data_dir=workdir / "valkey") as valkey,
        ):
            progress(f"nats-server at {server.url}, valkey at {valkey.url}, files in {workdir}")
            nc = await nats.connect(server.url)
            try:
                store = await open_event_store(server.url, prefix=f"bp{run_id()}")
                try:
                    progress(f"jetstream: populating {sizes.events:,} events (batched appends)")
                    head = await populate(store, sizes.events, sizes.agents)
                    await bench_agent_rebuild("jetstream", store, valkey.url, sizes, head)
                    await bench_audit_rebuild("jetstream", store, workdir, sizes, head)
                finally:
                    await store.close()
                store = await open_event_store(f"sqlite://{workdir / 'store.db'}")
                try:
                    progress(f"sqlite: populating {sizes.sqlite_events:,} events (batched appends)")
                    head = await populate(store, sizes.sqlite_events, sizes.agents)
                    await bench_agent_rebuild("sqlite", store, valkey.url, sizes, head)
                    await bench_audit_rebuild("sqlite", store, workdir, sizes, head)
                finally:
                    await store.close()
                await bench_lag(server.url, nc, valkey.url, workdir, sizes)
            finally:
                await nc.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    progress("done")


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (a few seconds)")
    parser.add_argument("--child-load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="fuse", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_load:
        load = child_load(args.child_load, args.prefix, args.rate, args.seconds, args.warmup)
        run_benchmark(load)
        return
    run_benchmark(main(QUICK if args.quick else FULL))


if __name__ == "__main__":
    cli()
