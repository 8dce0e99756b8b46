"""Saga benchmark: 3-step sagas through one orchestrator against 3 raw JetStream round trips.

One run starts one embedded nats-server. Lines (JSON, keys name, ours, baseline, unit, ratio,
n; ratio oriented so higher is better):
- `sagas.throughput`: 3-step sagas committed per second by one `Orchestrator` (concurrency
  64, steps that are local async functions returning at once), N sagas started together and
  awaited; the baseline is 64 concurrent tasks each doing 3 sequential raw nats-py
  `js.publish` round trips (awaited PubAck) per saga, N sagas, on the same stream.
- `sagas.latency.p50` / `.p99`: one saga at a time, from `start` to `wait` returning its
  committed state, ms; the baseline is 3 sequential raw publish-and-ack round trips. Target:
  p50 under 10 ms (`target_ms`).
- `sagas.end.p50`: what a saga's end costs the store, ms: one event (`saga.committed` holding
  the last outcome, as the orchestrator writes it); the baseline is the other way to make the
  two atomic, a 2-event ADR-50 batch (why the end is one event).
- `sagas.deadlock_detection.p50` / `.p99`: a 2-saga lock cycle (each holds its first lock,
  then asks for the other's), one orchestrator and one `DeadlockDetector`: ms from the wait
  that closed the cycle to the stored abort (`Detection.seconds`); the baseline is the target,
  500 ms (ratio >= 1: within it).

Usage: `python benchmarks/sagas.py [--quick] [--profile FILE]` (`--profile`: cProfile of the
latency phase into FILE, for `python -m pstats`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import nats
from _harness import emit, parser, percentile, progress, run_benchmark, run_id, workdir
from nats.js import JetStreamContext

from newfuse.core import DeadlockDetector, Orchestrator, Saga, StepContext
from newfuse.eventstore import NO_STREAM
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import NatsServer
from newfuse.schemas import NewEvent

CONCURRENCY = 64
TARGET_P50_MS = 10.0
DETECTION_TARGET_MS = 500.0


@dataclass(frozen=True)
class Sizes:
    """How much each phase does; `--quick` is a smoke run of a few seconds."""

    sagas: int  # sagas per throughput round
    rounds: int  # alternating throughput rounds per side (the best of each is kept)
    latency: int  # sequential sagas for the latency percentiles (and as many raw triples)
    cycles: int  # 2-saga deadlock cycles


FULL = Sizes(sagas=2_000, rounds=2, latency=1_000, cycles=30)
QUICK = Sizes(sagas=100, rounds=1, latency=50, cycles=3)


def three_steps() -> Saga:
    saga = Saga("bench3")
    for name in ("reserve", "charge", "confirm"):

        async def step(ctx: StepContext, name: str = name) -> str:
            return name

        saga.step(name)(step)
    return saga


# -- the raw baseline ------------------------------------------------------------------------------

_BODY = (
    b'{"id":"%s","stream":"rawsaga.x","type":"saga.step_completed","version":1,'
    b'"timestamp":"2026-12-03T10:00:00Z","data":{"sagaId":"x","step":"reserve","attempt":1,'
    b'"output":"reserve","timestamp":"2026-12-03T10:00:00Z"}}'
)


async def raw_saga(js: JetStreamContext, prefix: str) -> None:
    """Three sequential publishes, each awaiting its PubAck (about a step event's bytes)."""
    saga = uuid.uuid4().hex
    for n in range(3):
        event_id = f"{saga}-{n}"
        await js.publish(
            f"{prefix}.ev.rawsaga.{saga}",
            _BODY % event_id.encode(),
            headers={"Nats-Msg-Id": event_id},
        )


# -- throughput ------------------------------------------------------------------------------------


async def ours_throughput(orchestrator: Orchestrator, n: int) -> float:
    start = time.perf_counter()
    ids = [await orchestrator.start("bench3") for _ in range(n)]
    states = await asyncio.gather(*(orchestrator.wait(i, timeout=300) for i in ids))
    elapsed = time.perf_counter() - start
    assert all(s.status == "committed" for s in states), {s.status for s in states}
    return n / elapsed


async def raw_throughput(js: JetStreamContext, prefix: str, n: int) -> float:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await raw_saga(js, prefix)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return n / (time.perf_counter() - start)


async def bench_throughput(
    orchestrator: Orchestrator, js: JetStreamContext, prefix: str, sizes: Sizes
) -> None:
    await ours_throughput(orchestrator, max(10, sizes.sagas // 10))  # warm-up
    await raw_throughput(js, prefix, max(10, sizes.sagas // 10))
    ours = raw = 0.0
    for round_ in range(sizes.rounds):
        ours = max(ours, await ours_throughput(orchestrator, sizes.sagas))
        raw = max(raw, await raw_throughput(js, prefix, sizes.sagas))
        progress(f"throughput round {round_ + 1}: ours {ours:,.0f} sagas/s, raw {raw:,.0f}/s")
    emit(
        "sagas.throughput",
        ours,
        raw,
        "3-step sagas committed/s, one orchestrator, 64 in flight (baseline: 3 sequential raw "
        "publish-and-ack round trips per saga, 64 in flight)",
        n=sizes.sagas,
        lower_is_better=False,
    )


# -- latency ---------------------------------------------------------------------------------------


async def bench_latency(
    orchestrator: Orchestrator,
    js: JetStreamContext,
    prefix: str,
    sizes: Sizes,
    profile: str | None,
) -> None:
    ours: list[float] = []
    raw: list[float] = []
    for _ in range(max(5, sizes.latency // 10)):  # warm-up
        await orchestrator.wait(await orchestrator.start("bench3"), timeout=30)
        await raw_saga(js, prefix)
    profiler = cProfile.Profile() if profile else None
    for _ in range(sizes.latency):  # alternating, one at a time
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        state = await orchestrator.wait(await orchestrator.start("bench3"), timeout=30)
        ours.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.disable()
        assert state.status == "committed", state.status
        start = time.perf_counter()
        await raw_saga(js, prefix)
        raw.append(time.perf_counter() - start)
    if profiler is not None and profile:
        profiler.dump_stats(profile)
        progress(f"profile of the latency phase in {profile}")
    ours.sort()
    raw.sort()
    progress(
        f"latency: ours p50 {percentile(ours, 0.5) * 1e3:.2f} ms, p99 "
        f"{percentile(ours, 0.99) * 1e3:.2f} ms; raw p50 {percentile(raw, 0.5) * 1e3:.2f} ms, "
        f"p99 {percentile(raw, 0.99) * 1e3:.2f} ms"
    )
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        extra: dict[str, Any] = {"target_ms": TARGET_P50_MS} if label == "p50" else {}
        emit(
            f"sagas.latency.{label}",
            percentile(ours, fraction) * 1e3,
            percentile(raw, fraction) * 1e3,
            "ms, one 3-step saga from start to committed (baseline: 3 sequential raw "
            "publish-and-ack round trips)",
            n=sizes.latency,
            lower_is_better=True,
            **extra,
        )


# -- the end of a saga: one event, or two in an atomic batch ------------------------------------


async def bench_end(store: JetStreamEventStore, sizes: Sizes) -> None:
    """What the end of a saga costs: one event (its end holding its last outcome) against the
    same two as one atomic batch (ADR-50), alternating, on the same stream."""
    pair: list[float] = []
    single: list[float] = []
    for n in range(sizes.latency):
        events = [NewEvent(type="bench.outcome", data={"n": n}) for _ in range(2)]
        start = time.perf_counter()
        await store.append(f"benchend.p{n}", events, NO_STREAM)
        pair.append(time.perf_counter() - start)
        alone = NewEvent(type="bench.outcome", data={"n": n})
        start = time.perf_counter()
        await store.append(f"benchend.s{n}", alone, NO_STREAM)
        single.append(time.perf_counter() - start)
    pair.sort()
    single.sort()
    progress(
        f"a saga's end as one event p50 {percentile(single, 0.5) * 1e3:.2f} ms, as a 2-event "
        f"atomic batch {percentile(pair, 0.5) * 1e3:.2f} ms"
    )
    emit(
        "sagas.end.p50",
        percentile(single, 0.5) * 1e3,
        percentile(pair, 0.5) * 1e3,
        "ms, a saga's end: one event holding its last outcome (baseline: the two as a 2-event "
        "atomic batch)",
        n=sizes.latency,
        lower_is_better=True,
    )


# -- deadlock detection ----------------------------------------------------------------------------


def locking(name: str, first: str, second: str, barrier: asyncio.Barrier) -> Saga:
    """`hold` locks `first` and waits for its partner to hold its own; `take` locks `second`."""
    saga = Saga(name)

    @saga.step("hold", locks=(first,))
    async def hold(ctx: StepContext) -> None:
        async with asyncio.timeout(30):
            await barrier.wait()

    @saga.compensate("hold")
    async def undo(ctx: StepContext) -> None:
        return None

    @saga.step("take", locks=(second,))
    async def take(ctx: StepContext) -> None:
        return None

    return saga


async def bench_deadlocks(url: str, sizes: Sizes) -> None:
    """The cycles run on a store of their own prefix, with one orchestrator that knows every
    cycle's sagas (a new orchestrator per cycle would first catch up on every saga before)."""
    store = await JetStreamEventStore.connect(url, prefix=f"bd{run_id()}")
    detector = DeadlockDetector(store, name="bench-detector")
    barriers = [asyncio.Barrier(2) for _ in range(sizes.cycles)]
    cycles = []
    for n, barrier in enumerate(barriers):
        a, b = f"c{n}a", f"c{n}b"
        cycles.append((locking(f"p{n}x", a, b, barrier), locking(f"p{n}y", b, a, barrier)))
    seconds: list[float] = []
    try:
        async with detector, Orchestrator(store, [s for c in cycles for s in c]) as orchestrator:
            for older, younger in cycles:
                before = len(detector.detections)
                first = await orchestrator.start(older)
                await asyncio.sleep(0.005)  # distinct start times: the second is the youngest
                second = await orchestrator.start(younger)
                ends = [await orchestrator.wait(s, timeout=60) for s in (first, second)]
                assert sorted(e.status for e in ends) == ["committed", "rolled_back"], ends
                found = detector.detections[before:]
                assert len(found) == 1, found
                seconds.append(found[0].seconds)
    finally:
        await store.close()
    seconds.sort()
    progress(
        f"deadlock detection over {len(seconds)} cycles: p50 {percentile(seconds, 0.5) * 1e3:.1f}"
        f" ms, p99 {percentile(seconds, 0.99) * 1e3:.1f} ms, max {seconds[-1] * 1e3:.1f} ms"
    )
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        emit(
            f"sagas.deadlock_detection.{label}",
            percentile(seconds, fraction) * 1e3,
            DETECTION_TARGET_MS,
            "ms from the wait that closed a 2-saga cycle to the stored abort (baseline: the "
            "target, 500 ms)",
            n=len(seconds),
            lower_is_better=True,
            max_ms=round(seconds[-1] * 1e3, 3),
        )


async def main(sizes: Sizes, profile: str | None) -> None:
    async with workdir("sagas") as files, NatsServer(data_dir=files / "nats") as server:
        progress(f"nats-server at {server.url}, files in {files}")
        prefix = f"bs{run_id()}"
        store = await JetStreamEventStore.connect(server.url, prefix=prefix)
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await store.head_position()  # the stream exists before the raw side publishes
            async with Orchestrator(
                store, [three_steps()], concurrency=CONCURRENCY, name="bench"
            ) as orchestrator:
                await bench_latency(orchestrator, js, prefix, sizes, profile)
                await bench_throughput(orchestrator, js, prefix, sizes)
            await bench_end(store, sizes)
            await bench_deadlocks(server.url, sizes)
        finally:
            await nc.close()
            await store.close()
    progress("done")


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    command: argparse.ArgumentParser = parser(__doc__)
    command.add_argument("--profile", metavar="FILE", help="cProfile the latency phase into FILE")
    args = command.parse_args(argv)
    run_benchmark(main(QUICK if args.quick else FULL, args.profile))


if __name__ == "__main__":
    cli()
