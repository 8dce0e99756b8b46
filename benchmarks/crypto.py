"""Sealed-field benchmark: append and read an event with one encrypted field against the same
event without, on JetStream (keys in the deployment's KV bucket) and on SQLite (keys in a local
file), through the public API.

One run starts one embedded nats-server. Lines (JSON, keys name, ours, baseline, unit, ratio,
n, plus overhead = baseline-relative cost, target_overhead 0.15 and within_target); the
JetStream ones are named below, the SQLite ones are the same names under `crypto.sqlite.`:
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

`--steps` prints instead where the time of reading one sealed event goes: microseconds per
step of `EventStore.decode` (SQLite store, best of rounds of CPU time), beside the plain
event's decode, for when the overhead is over its target.

Usage: `python benchmarks/crypto.py [--quick] [--backend jetstream|sqlite|both] [--steps]`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import msgspec
from _harness import emit, parser, percentile, progress, run_benchmark, run_id, workdir
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from newfuse.eventstore import EventFilter, EventStore, StoredRecord, open_event_store
from newfuse.nats import NatsServer
from newfuse.schemas import (
    DataSubject,
    Envelope,
    NewEvent,
    Personal,
    SchemaRegistry,
    SealedValue,
    SealPlan,
    default_registry,
    parse_envelope,
)
from newfuse.schemas.sealed import SEALED_DECODER, associated_data, unb64
from newfuse.security import KVKeyStore, SQLiteKeyStore, SubjectCipher, use_keys

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


async def bench_latency(store: EventStore, sizes: Sizes, name: str) -> None:
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
            progress(
                f"{name} append latency round {round_ + 1} {category(sealed)}: p50 {p50:.3f} ms"
            )
    line(f"{name}.append.latency.p50", best[True], best[False], "ms", sizes.latency, lower=True)


async def bench_concurrent(store: EventStore, sizes: Sizes, run: str, name: str) -> None:
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
                f"{name} append concurrent round {round_ + 1} {category(sealed)}: {rate:,.0f}/s, "
                f"{cpu[sealed][-1]:,.0f} per CPU second"
            )
    line(f"{name}.append.concurrent", wall[True], wall[False], "events/s", sizes.concurrent)
    line(
        f"{name}.append.concurrent.cpu",
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


async def bench_read(store: EventStore, sizes: Sizes, name: str) -> None:
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
                f"{name} read_all round {round_} {category(sealed)}: {count} at {rate:,.0f}/s, "
                f"{per_cpu:,.0f} per CPU second"
            )
    line(f"{name}.read_all", wall[True], wall[False], "events/s (typed decode)", count)
    line(
        f"{name}.read_all.cpu",
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


def registry() -> SchemaRegistry:
    registry = default_registry()
    registry.add("bench.signed_up", 1, SignedUp)
    registry.add("bench.plain_signed_up", 1, PlainSignedUp)
    return registry


async def measure(store: EventStore, sizes: Sizes, name: str) -> None:
    """Every phase on one store whose cipher is set: both sides read and write through it."""
    await asyncio.gather(*(store.append("warm.keys", event(True, n)) for n in range(CUSTOMERS)))
    await bench_latency(store, sizes, name)
    await bench_concurrent(store, sizes, run_id(), name)
    await fill(store, sizes)
    await bench_read(store, sizes, name)


async def on_jetstream(sizes: Sizes, files: Path) -> None:
    async with NatsServer(data_dir=files / "nats") as server:
        progress(f"nats-server at {server.url}, files in {files}")
        prefix = f"bc{run_id()}"
        async with await open_event_store(server.url, prefix=prefix, registry=registry()) as store:
            keys = await KVKeyStore.open(store.nc, prefix)  # type: ignore[attr-defined]
            use_keys(store, keys, owns_keys=True)
            await measure(store, sizes, "crypto")


async def on_sqlite(sizes: Sizes, files: Path) -> None:
    url = f"sqlite:///{files / 'events.db'}"
    async with await open_event_store(url, registry=registry()) as store:
        use_keys(store, await SQLiteKeyStore.open(files / "keys.sqlite"), owns_keys=True)
        await measure(store, sizes, "crypto.sqlite")


async def main(sizes: Sizes, backends: tuple[str, ...]) -> None:
    async with workdir("crypto") as files:
        if "jetstream" in backends:
            await on_jetstream(sizes, files)
        if "sqlite" in backends:
            await on_sqlite(sizes, files)
    progress("done")


# -- where the time of reading a sealed event goes (--steps) ------------------------------------


def cpu_us(step: Callable[[_Sample], object], samples: list[_Sample], rounds: int) -> float:
    """CPU microseconds per call of `step` over `samples`, best of `rounds`."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for sample in samples:
            step(sample)
        best = min(best, time.process_time() - start)
    return best / len(samples) * 1e6


@dataclass(frozen=True)
class _Sample:
    """One stored event, taken apart as far as each step needs."""

    record: StoredRecord
    envelope: Envelope
    data: bytes  # the payload as stored (sealed)
    raw: bytes  # the sealed value of `email`, as stored
    value: SealedValue
    plaintext: bytes  # the value's JSON
    opened: bytes  # the payload opened
    nonce: bytes
    sealed: bytes
    aad: bytes


async def steps(sizes: Sizes) -> None:
    """Print the cost of each step of decoding one sealed event (SQLite store)."""
    count, rounds = sizes.read // 4, sizes.read_rounds * 3
    async with workdir("crypto-steps") as files:
        url = f"sqlite:///{files / 'events.db'}"
        async with await open_event_store(url, registry=registry()) as store:
            cipher = use_keys(
                store, await SQLiteKeyStore.open(files / "keys.sqlite"), owns_keys=True
            )
            for sealed in (True, False):
                for start in range(0, count, 500):  # batches within the store's limit
                    batch = [event(sealed, n) for n in range(start, min(start + 500, count))]
                    await store.append(f"{category(sealed)}.steps{start}", batch)
            records: dict[bool, list[StoredRecord]] = {True: [], False: []}
            async for record in store.records():
                records[record.stream.startswith("sealed")].append(record)
            async for _ in store.read_all():  # loads the keys
                pass
            plan = store.registry.sealed("bench.signed_up", 1)
            assert plan is not None
            samples = [sample(cipher, plan, record) for record in records[True]]
            plain = [
                replace(samples[0], record=r, envelope=parse_envelope(r.body, "", r.stream))
                for r in records[False]
            ]
            key = AESGCM(AESGCM.generate_key(256))  # the cipher's own keys stay inside it
            shut = [replace(s, sealed=key.encrypt(s.nonce, s.opened, s.aad)) for s in samples]
            payload = store.registry.decode

            def decode(s: _Sample) -> object:
                return store.decode(s.record.body, s.record.position, "", s.record.stream)

            table = {
                "decode, plain event (all of it)": cpu_us(decode, plain, rounds),
                "decode, sealed event (all of it)": cpu_us(decode, samples, rounds),
                "  envelope parse (SQLite: a second one)": cpu_us(
                    lambda s: parse_envelope(s.record.body, "", s.record.stream), samples, rounds
                ),
                "  SealPlan.open (all of it)": cpu_us(
                    lambda s: plan.open(s.data, s.envelope.id, s.envelope.stream, cipher),
                    samples,
                    rounds,
                ),
                "    probe (the payload, `email` kept raw)": cpu_us(
                    lambda s: _PROBE.decode(s.data), samples, rounds
                ),
                "    SealedValue decode": cpu_us(
                    lambda s: SEALED_DECODER.decode(s.raw), samples, rounds
                ),
                "    SubjectCipher.decrypt (all of it)": cpu_us(
                    lambda s: cipher.decrypt(s.value, s.envelope.id, "$.email"), samples, rounds
                ),
                "      base64url of iv and ct": cpu_us(
                    lambda s: unb64(s.value.iv + s.value.ct), samples, rounds
                ),
                "      associated data": cpu_us(
                    lambda s: associated_data(s.envelope.id, "$.email", s.value.sub, s.value.kid),
                    samples,
                    rounds,
                ),
                "      AES-256-GCM decrypt": cpu_us(
                    lambda s: key.decrypt(s.nonce, s.sealed, s.aad), shut, rounds
                ),
                "    splice (two finds, one join)": cpu_us(splice, samples, rounds),
                "  payload decode (the plain event's too)": cpu_us(
                    lambda s: payload("bench.signed_up", 1, s.opened), samples, rounds
                ),
            }
    width = max(map(len, table))
    for label, us in table.items():
        print(f"{label:<{width}}  {us:6.2f} us")


class _Probe(msgspec.Struct, kw_only=True):
    """What SealPlan's probe of a `bench.signed_up` decodes: the sealed field, the subject."""

    email: msgspec.Raw = msgspec.Raw()
    customer: Any = None


_PROBE = msgspec.json.Decoder(_Probe)


def splice(s: _Sample) -> bytes:
    """The opened payload, as SealPlan.open makes it: the sealed value found, checked to be
    the only one, and replaced by the plaintext."""
    start = s.data.find(s.raw)
    end = start + len(s.raw)
    if s.data.find(s.raw, end) >= 0:
        raise AssertionError("the benchmark's event holds its sealed value once")
    return s.data[:start] + s.plaintext + s.data[end:]


def sample(cipher: SubjectCipher, plan: SealPlan, record: StoredRecord) -> _Sample:
    envelope = parse_envelope(record.body, "", record.stream)
    data = bytes(envelope.data)
    raw = bytes(_PROBE.decode(data).email)
    value = SEALED_DECODER.decode(raw)
    both = unb64(value.iv + value.ct)
    plaintext = cipher.decrypt(value, envelope.id, "$.email")
    assert plaintext is not None
    return _Sample(
        record=record,
        envelope=envelope,
        data=data,
        raw=raw,
        value=value,
        plaintext=plaintext,
        opened=plan.open(data, envelope.id, envelope.stream, cipher).data,
        nonce=both[:12],
        sealed=both[12:],
        aad=associated_data(envelope.id, "$.email", value.sub, value.kid),
    )


def cli(argv: list[str] | None = None) -> None:
    options = parser(__doc__)
    options.add_argument("--backend", choices=("jetstream", "sqlite", "both"), default="both")
    options.add_argument("--steps", action="store_true", help="cost per step of a sealed read")
    args = options.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.steps:
        run_benchmark(steps(sizes))
        return
    backends = ("jetstream", "sqlite") if args.backend == "both" else (args.backend,)
    run_benchmark(main(sizes, backends))


if __name__ == "__main__":
    cli()
