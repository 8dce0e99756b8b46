"""Projection lag benchmark: append ack to committed checkpoint, next to a minimal raw projector.

Usage: `python benchmarks/projection_lag.py [--quick]` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec
import nats
import redis.asyncio as redis
from _harness import (
    Sizes,
    emit,
    parser,
    percentile,
    progress,
    report,
    run_benchmark,
    run_child,
    run_id,
    sizes_of,
    workdir,
)
from _projections import AUDIT_INDEXES, AUDIT_TABLE, audit_row, hset_fields, new_event
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from newfuse.errors import ProjectionTimeoutError
from newfuse.eventstore import EventStore, open_event_store
from newfuse.nats import NatsServer
from newfuse.nats.embedded import ValkeyServer
from newfuse.projections import (
    ProjectionRunner,
    RedisReadModel,
    SQLiteReadModel,
    agent_state_projection,
    audit_projection,
)
from newfuse.schemas import Envelope, RecordedEvent, StateUpdate

SCRIPT = str(Path(__file__).resolve())

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
        await self._connection.execute(AUDIT_TABLE)
        for suffix, columns in AUDIT_INDEXES:
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
                pipe.hset(f"rawlag:agent:{update.agent_id}", mapping=hset_fields(update, position))
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
        report(await load(store, rate, seconds, warmup))
    finally:
        await store.close()


async def run_child_load(url: str, prefix: str, sizes: Sizes) -> dict[str, Any]:
    return await run_child(
        *(SCRIPT, "--child-load", url, "--prefix", prefix, "--rate", str(sizes.lag_rate)),
        *("--seconds", str(sizes.lag_seconds), "--warmup", str(sizes.lag_warmup)),
        timeout=sizes.lag_seconds * 10 + 60,
    )


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


async def main(sizes: Sizes) -> None:
    async with (
        workdir("lag") as path,
        NatsServer(data_dir=path / "nats") as server,
        ValkeyServer(data_dir=path / "valkey") as valkey,
    ):
        progress(f"nats-server at {server.url}, valkey at {valkey.url}, files in {path}")
        nc = await nats.connect(server.url)
        try:
            await bench_lag(server.url, nc, valkey.url, path, sizes)
        finally:
            await nc.close()


if __name__ == "__main__":
    command = parser(__doc__)
    command.add_argument("--child-load", metavar="URL", help=argparse.SUPPRESS)
    command.add_argument("--prefix", default="fuse", help=argparse.SUPPRESS)
    command.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    command.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    command.add_argument("--warmup", type=float, default=0.0, help=argparse.SUPPRESS)
    args = command.parse_args()
    if args.child_load:
        run_benchmark(
            child_load(args.child_load, args.prefix, args.rate, args.seconds, args.warmup)
        )
    else:
        run_benchmark(main(sizes_of(args)))
