"""Sealed-field benchmark: append and read an event with one encrypted field against the same
event without, on JetStream, through the public API (keys in the deployment's KV bucket).

One run starts one embedded nats-server. Lines (JSON, keys name, ours, baseline, unit, ratio,
n, plus overhead = baseline-relative cost, target_overhead 0.15 and within_target):
- `crypto.append.latency.p50`: ms per sequential `append` (expected version given) of a
  `bench.signed_up` whose `email` is `Personal()` (sealed with AES-256-GCM under its
  customer's key); baseline: the same struct without the marker. ratio = baseline / ours.
- `crypto.append.concurrent`: events/s with 32 appenders in flight (one stream each).
- `crypto.append.concurrent.cpu`: the same rounds, events per CPU second of this process
  (median of rounds): the cost of sealing, less blurred by other load on the machine.
- `crypto.read_all`: events/s of `read_all` over one category (typed decode; the sealed side
  opens each value); the baseline reads the plain category of the same size.
- `crypto.read_all.cpu`: the same rounds, events per CPU second of this process (median).

Keys exist before the measured rounds (a warm-up creates one per customer, 64 customers), so
the figures are the steady state: one cached AES-GCM object per subject. Rounds alternate
(ours, baseline, ...) and the best of each side is kept.

Usage: `python benchmarks/crypto.py [--quick]`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Annotated

import msgspec
from _harness import emit, parser, percentile, progress, run_benchmark, run_id, workdir

from newfuse.eventstore import EventFilter, EventStore, open_event_store
from newfuse.nats import NatsServer
from newfuse.schemas import DataSubject, NewEvent, Personal, default_registry
from newfuse.security import KVKeyStore, use_keys

CUSTOMERS = 64
CONCURRENCY = 32
TARGET = 0.15


class SignedUp(msgspec.Struct, frozen=True, kw_only=True):
    customer: Annotated[str, DataSubject()]
    email: Annotated[str, Personal()]
    plan: str
    region: str
    referrer: str | None = None
    seats: int = 1


class PlainSignedUp(msgspec.Struct, frozen=True, kw_only=True):
    customer: str
    email: str
    plan: str
    region: str
    referrer: str | None = None
    seats: int = 1


@dataclass(frozen=True)
class Sizes:
    latency: int  # sequential appends per round
    concurrent: int  # appends per concurrent round
    read: int  # events per read round (each side's category)
    rounds: int
    read_rounds: int


FULL = Sizes(latency=2_000, concurrent=10_000, read=20_000, rounds=3, read_rounds=7)
QUICK = Sizes(latency=100, concurrent=400, read=1_000, rounds=1, read_rounds=1)


def event(sealed: bool, n: int) -> NewEvent:
    fields = {
        "customer": f"customer-{n % CUSTOMERS}",
        "email": f"person-{n}@example.com",
        "plan": "pro",
        "region": "eu-west-1",
        "referrer": "newsletter-2026-11",
        "seats": 5,
    }
    cls = SignedUp if sealed else PlainSignedUp
    return NewEvent(data=cls(**fields))  # type: ignore[arg-type]


def category(sealed: bool) -> str:
    return "sealed" if sealed else "plain"


async def bench_latency(store: EventStore, sizes: Sizes) -> None:
    best: dict[bool, float] = {}
    versions = {True: 0, False: 0}
    for round_ in range(sizes.rounds):
        for sealed in (True, False):
            stream = f"{category(sealed)}.latency"
            times: list[float] = []
            for n in range(sizes.latency):
                start = time.perf_counter()
                await store.append(stream, event(sealed, n), versions[sealed])
                times.append((time.perf_counter() - start) * 1000)
                versions[sealed] += 1
            p50 = percentile(sorted(times), 0.5)
            best[sealed] = min(best.get(sealed, p50), p50)
            progress(f"append latency round {round_ + 1} {category(sealed)}: p50 {p50:.3f} ms")
    line("crypto.append.latency.p50", best[True], best[False], "ms", sizes.latency, lower=True)


async def bench_concurrent(store: EventStore, sizes: Sizes, run: str) -> None:
    wall: dict[bool, float] = {}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    per = sizes.concurrent // CONCURRENCY
    for round_ in range(sizes.rounds):
        for sealed in (True, False):

            async def appender(k: int, sealed: bool = sealed, round_: int = round_) -> None:
                stream = f"{category(sealed)}.c{run}{round_}x{k}"
                for n in range(per):
                    await store.append(stream, event(sealed, n * CONCURRENCY + k), n)

            start, start_cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(appender(k) for k in range(CONCURRENCY)))
            rate = per * CONCURRENCY / (time.perf_counter() - start)
            cpu[sealed].append(per * CONCURRENCY / (time.process_time() - start_cpu))
            wall[sealed] = max(wall.get(sealed, rate), rate)
            progress(
                f"append concurrent round {round_ + 1} {category(sealed)}: {rate:,.0f}/s, "
                f"{cpu[sealed][-1]:,.0f} per CPU second"
            )
    line("crypto.append.concurrent", wall[True], wall[False], "events/s", sizes.concurrent)
    line(
        "crypto.append.concurrent.cpu",
        statistics.median(cpu[True]),
        statistics.median(cpu[False]),
        "events per CPU second of the appending process (median of rounds)",
        sizes.concurrent,
    )


async def fill(store: EventStore, sizes: Sizes) -> None:
    for sealed in (True, False):
        for start in range(0, sizes.read, 500):
            await asyncio.gather(
                *(
                    store.append(f"{category(sealed)}.read{k}", event(sealed, start + k))
                    for k in range(min(500, sizes.read - start))
                )
            )


async def bench_read(store: EventStore, sizes: Sizes) -> None:
    wall: dict[bool, float] = {}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    count = 0
    for round_ in range(sizes.read_rounds + 1):  # the first round of each side warms up
        for sealed in (True, False):
            wanted = EventFilter(categories=(category(sealed),))
            start, start_cpu = time.perf_counter(), time.process_time()
            count = 0
            async for _ in store.read_all(filter=wanted):
                count += 1
            rate = count / (time.perf_counter() - start)
            per_cpu = count / (time.process_time() - start_cpu)
            if round_:
                wall[sealed] = max(wall.get(sealed, rate), rate)
                cpu[sealed].append(per_cpu)
            progress(
                f"read_all round {round_} {category(sealed)}: {count} at {rate:,.0f}/s, "
                f"{per_cpu:,.0f} per CPU second"
            )
    line("crypto.read_all", wall[True], wall[False], "events/s (typed decode)", count)
    line(
        "crypto.read_all.cpu",
        statistics.median(cpu[True]),
        statistics.median(cpu[False]),
        "events per CPU second of the reading process (median of rounds)",
        count,
    )


def line(
    name: str, ours: float, baseline: float, unit: str, n: int, *, lower: bool = False
) -> None:
    overhead = (ours / baseline - 1) if lower else (baseline / ours - 1)
    emit(
        name,
        ours,
        baseline,
        unit,
        n=n,
        lower_is_better=lower,
        overhead=round(overhead, 3),
        target_overhead=TARGET,
        within_target=overhead <= TARGET,
    )


async def main(sizes: Sizes) -> None:
    async with workdir("crypto") as files, NatsServer(data_dir=files / "nats") as server:
        progress(f"nats-server at {server.url}, files in {files}")
        registry = default_registry()
        registry.add("bench.signed_up", 1, SignedUp)
        registry.add("bench.plain_signed_up", 1, PlainSignedUp)
        prefix = f"bc{run_id()}"
        async with await open_event_store(server.url, prefix=prefix, registry=registry) as store:
            keys = await KVKeyStore.open(store.nc, prefix)  # type: ignore[attr-defined]
            use_keys(store, keys, owns_keys=True)
            await asyncio.gather(*(store.append("warm.keys", event(True, n)) for n in range(64)))
            await bench_latency(store, sizes)
            await bench_concurrent(store, sizes, run_id())
            await fill(store, sizes)
            await bench_read(store, sizes)
    progress("done")


def cli(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    run_benchmark(main(QUICK if args.quick else FULL))


if __name__ == "__main__":
    cli()
