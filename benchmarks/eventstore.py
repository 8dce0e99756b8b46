"""Event store benchmark: our backends side by side with raw nats-py and `eventsourcing`.

One run starts one embedded nats-server and uses temp files for SQLite; every measurement runs
our code and its baseline on the same server, with the same payload bytes and the same
concurrency, after a warm-up, in alternating rounds (the best round of each side is kept).
Progress goes to stderr; results go to stdout as JSON lines with the keys name, ours, baseline,
unit, ratio and n, where ratio is ours / baseline for throughput and baseline / ours for latency
and memory (so higher is always better).

Usage: `python benchmarks/eventstore.py [--quick] [--only sqlite|sqlite.append|sqlite.read]`
(see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
from _harness import emit, percentile, progress, run_benchmark, run_id, timed
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from newfuse.eventstore import NO_STREAM, EventStore, open_event_store
from newfuse.nats import NatsServer
from newfuse.nats.cluster import NatsCluster
from newfuse.schemas import Envelope, NewEvent, StateUpdate, new_event_id, utcnow

TYPE = "agent.state_update"
EXPECTED_SEQ = "Nats-Expected-Last-Subject-Sequence"

# -- sizes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much each phase does; `--quick` is a smoke run of a few seconds."""

    streams: int  # JetStream appenders in flight (one stream each)
    append_events: int  # events per JetStream throughput round
    latency_events: int  # sequential appends for the latency percentiles
    read_events: int  # events in the read_all phase
    sqlite_appenders: int  # concurrent SQLite appenders (tasks for us, threads for eventsourcing)
    sqlite_append_events: int  # events per concurrent SQLite round
    sqlite_single_events: int  # events per single-appender SQLite round
    sqlite_read_events: int  # events in the SQLite read phase
    sqlite_stream_size: int  # events per stream in the SQLite read phase
    replay_events: int  # events replayed for the peak-RSS measurement
    rounds: int  # measured rounds per side (after one warm-up)
    cluster_events: int  # events per round on the 3-node cluster
    cluster_kill_seconds: float  # seconds of load around the stream-leader kill


FULL = Sizes(
    streams=256,
    append_events=50_000,
    latency_events=5_000,
    read_events=200_000,
    sqlite_appenders=16,
    sqlite_append_events=20_000,
    sqlite_single_events=4_000,
    sqlite_read_events=100_000,
    sqlite_stream_size=500,
    replay_events=1_000_000,
    rounds=3,
    cluster_events=20_000,
    cluster_kill_seconds=12.0,
)
QUICK = Sizes(
    streams=32,
    append_events=1_000,
    latency_events=200,
    read_events=3_000,
    sqlite_appenders=8,
    sqlite_append_events=400,
    sqlite_single_events=100,
    sqlite_read_events=2_000,
    sqlite_stream_size=100,
    replay_events=10_000,
    rounds=1,
    cluster_events=1_000,
    cluster_kill_seconds=8.0,
)

# -- output ----------------------------------------------------------------------------------------


# -- events and their bytes ------------------------------------------------------------------------

_PAYLOAD_ENCODER = msgspec.json.Encoder()
_BODY_ENCODER = msgspec.json.Encoder()
_ENVELOPE_DECODER = msgspec.json.Decoder(Envelope)
_PAYLOAD_DECODER = msgspec.json.Decoder(StateUpdate)


def payload(i: int) -> StateUpdate:
    """The payload every phase appends: a typed state update of about 200 bytes."""
    return StateUpdate(
        agent_id=f"agent-{i % 1000}",
        state={"step": "plan", "turn": i, "note": "n" * 100},
        version=i,
    )


def new_event(i: int) -> NewEvent:
    """What our store is given: a registered payload struct, the store encodes it."""
    return NewEvent(data=payload(i), correlation_id=f"conv-{i % 100}")


def wire_body(stream: str, version: int, i: int) -> tuple[str, bytes]:
    """(event id, body) for a baseline: the same envelope JSON our store writes for `new_event(i)`.

    The baselines get their bytes encoded in advance, so they do strictly less work than we do.
    """
    event_id = new_event_id()
    envelope = Envelope(
        id=event_id,
        stream=stream,
        type=TYPE,
        schema_version=1,
        version=version,
        timestamp=utcnow(),
        correlation_id=f"conv-{i % 100}",
        data=msgspec.Raw(_PAYLOAD_ENCODER.encode(payload(i))),
    )
    return event_id, _BODY_ENCODER.encode(envelope)


def decode_typed(body: bytes) -> StateUpdate:
    """The baselines' typed decode: envelope, then payload into its struct (what read_all does)."""
    envelope = _ENVELOPE_DECODER.decode(body)
    return _PAYLOAD_DECODER.decode(envelope.data)


# -- headers: the raw publisher sends what our store sends ----------------------------------------


class HeaderTemplate:
    """The headers our store put on one captured message, turned into a per-message recipe.

    Values equal to the event id, the stream or the stream version are replaced per message; the
    expected-last-subject-sequence header carries the raw publisher's own last ack sequence; a
    batch id is made unique; anything else is copied verbatim.
    """

    def __init__(self, captured: dict[str, str], *, event_id: str, stream: str, version: int):
        self.captured = dict(captured)
        self.kinds: list[tuple[str, str, str]] = []
        for name, value in captured.items():
            if name == EXPECTED_SEQ:
                kind = "seq"
            elif name == "Nats-Batch-Id":
                kind = "unique"
            elif value == event_id:
                kind = "id"
            elif value == stream:
                kind = "stream"
            elif value == str(version):
                kind = "version"
            else:
                kind = "const"
            self.kinds.append((name, kind, value))

    def build(self, *, event_id: str, stream: str, version: int, last_seq: int) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, kind, value in self.kinds:
            if kind == "seq":
                headers[name] = str(last_seq)
            elif kind == "unique":
                headers[name] = uuid.uuid4().hex
            elif kind == "id":
                headers[name] = event_id
            elif kind == "stream":
                headers[name] = stream
            elif kind == "version":
                headers[name] = str(version)
            else:
                headers[name] = value
        return headers


async def capture_headers(store: EventStore, nc: NatsClient, prefix: str) -> HeaderTemplate:
    """Append three events with our store and keep the headers of the third as it went out."""
    stream = f"bench.capture-{uuid.uuid4().hex[:8]}"
    seen: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        await seen.put(msg)

    sub = await nc.subscribe(f"{prefix}.ev.{stream}", cb=on_message)
    await nc.flush()
    version = 0
    for i in range(3):
        version = (await store.append(stream, new_event(i), version)).version
    msg: Msg | None = None
    for _ in range(3):
        msg = await asyncio.wait_for(seen.get(), 10)
    await sub.unsubscribe()
    assert msg is not None
    envelope = _ENVELOPE_DECODER.decode(msg.data)
    headers = dict(msg.headers or {})
    progress(f"our store publishes with headers: {sorted(headers)}")
    return HeaderTemplate(headers, event_id=envelope.id, stream=stream, version=envelope.version)


# -- timing helpers --------------------------------------------------------------------------------


# -- JetStream: append throughput ------------------------------------------------------------------


async def ours_append_concurrent(store: EventStore, streams: int, total: int) -> tuple[int, float]:
    """`streams` appenders, one event per call, each with the expected version of its stream."""
    per = max(1, total // streams)
    rid = run_id()
    batches = [[new_event(s * per + i) for i in range(per)] for s in range(streams)]

    async def writer(s: int) -> None:
        name = f"bench.{rid}-{s}"
        version = 0
        for event in batches[s]:
            version = (await store.append(name, event, version)).version

    async def run() -> int:
        await asyncio.gather(*(writer(s) for s in range(streams)))
        return per * streams

    return await timed(run)


async def raw_append_concurrent(
    js: JetStreamContext,
    prefix: str,
    template: HeaderTemplate,
    streams: int,
    total: int,
    *,
    use_async: bool,
) -> tuple[int, float]:
    """The same appends with plain nats-py: same subjects, bytes, headers and appenders in flight.

    Each appender keeps its own subject's last sequence from the acks (the cheapest possible
    source of the expected-last-subject-sequence header), so one message per stream is in flight.
    """
    per = max(1, total // streams)
    rid = run_id()
    bodies = [
        [wire_body(f"bench.{rid}-{s}", i + 1, s * per + i) for i in range(per)]
        for s in range(streams)
    ]

    async def writer(s: int) -> None:
        stream = f"bench.{rid}-{s}"
        subject = f"{prefix}.ev.{stream}"
        last_seq = 0
        for version, (event_id, body) in enumerate(bodies[s], 1):
            headers = template.build(
                event_id=event_id, stream=stream, version=version, last_seq=last_seq
            )
            if use_async:
                future = await js.publish_async(subject, body, headers=headers)
                last_seq = (await future).seq
            else:
                last_seq = (await js.publish(subject, body, headers=headers)).seq

    async def run() -> int:
        await asyncio.gather(*(writer(s) for s in range(streams)))
        return per * streams

    return await timed(run)


Side = Callable[[int], Awaitable[tuple[int, float]]]
"""One side of a throughput comparison: given a number of events, (events done, seconds)."""


async def best_rates(
    sides: dict[str, Side], sizes: Sizes, events: int, label: str
) -> dict[str, float]:
    """One warm-up of every side, then `sizes.rounds` alternating rounds; the best rate of each."""
    best = dict.fromkeys(sides, 0.0)
    for side in sides.values():  # warm-up
        await side(max(sizes.streams, events // 10))
    for round_no in range(sizes.rounds):
        for key, side in sides.items():
            count, seconds = await side(events)
            best[key] = max(best[key], count / seconds)
            progress(f"  {label}round {round_no + 1} {key}: {count / seconds:,.0f} events/s")
    return best


async def bench_jetstream_append(
    store: EventStore, js: JetStreamContext, prefix: str, template: HeaderTemplate, sizes: Sizes
) -> None:
    progress(f"jetstream append: {sizes.streams} streams in flight, {sizes.append_events} events")
    sides: dict[str, Side] = {
        "ours": lambda n: ours_append_concurrent(store, sizes.streams, n),
        "raw_publish": lambda n: raw_append_concurrent(
            js, prefix, template, sizes.streams, n, use_async=False
        ),
        "raw_publish_async": lambda n: raw_append_concurrent(
            js, prefix, template, sizes.streams, n, use_async=True
        ),
    }
    best = await best_rates(sides, sizes, sizes.append_events, "")
    baseline = max(best["raw_publish"], best["raw_publish_async"])
    emit(
        "jetstream.append.concurrent",
        best["ours"],
        baseline,
        f"events/s ({sizes.streams} streams in flight, 1 event per append, expected version; "
        "baseline: fastest of nats-py publish / publish_async)",
        n=sizes.append_events,
        lower_is_better=False,
    )


# -- JetStream: append latency ---------------------------------------------------------------------


async def ours_latencies(store: EventStore, count: int) -> list[float]:
    stream = f"bench.latency-{run_id()}"
    events = [new_event(i) for i in range(count)]
    samples: list[float] = []
    version = 0
    for event in events:
        start = time.perf_counter()
        version = (await store.append(stream, event, version)).version
        samples.append(time.perf_counter() - start)
    return samples


async def raw_latencies(
    js: JetStreamContext, prefix: str, template: HeaderTemplate, count: int
) -> list[float]:
    stream = f"bench.latency-{run_id()}"
    subject = f"{prefix}.ev.{stream}"
    bodies = [wire_body(stream, i + 1, i) for i in range(count)]
    samples: list[float] = []
    last_seq = 0
    for version, (event_id, body) in enumerate(bodies, 1):
        start = time.perf_counter()
        headers = template.build(
            event_id=event_id, stream=stream, version=version, last_seq=last_seq
        )
        last_seq = (await js.publish(subject, body, headers=headers)).seq
        samples.append(time.perf_counter() - start)
    return samples


async def bench_jetstream_latency(
    store: EventStore, js: JetStreamContext, prefix: str, template: HeaderTemplate, sizes: Sizes
) -> None:
    progress(f"jetstream sequential append latency: {sizes.latency_events} appends per side")
    await ours_latencies(store, max(20, sizes.latency_events // 10))
    await raw_latencies(js, prefix, template, max(20, sizes.latency_events // 10))
    ours: list[float] = []
    raw: list[float] = []
    for _ in range(sizes.rounds):
        raw.extend(await raw_latencies(js, prefix, template, sizes.latency_events))
        ours.extend(await ours_latencies(store, sizes.latency_events))
    ours.sort()
    raw.sort()
    for label, fraction in (("p50", 0.50), ("p99", 0.99)):
        emit(
            f"jetstream.append.latency.{label}",
            percentile(ours, fraction) * 1000,
            percentile(raw, fraction) * 1000,
            "ms (sequential appends to one stream, expected version; baseline: awaited nats-py "
            "publish; ratio = baseline/ours, higher is better)",
            n=len(ours),
            lower_is_better=True,
        )


# -- JetStream: read_all ---------------------------------------------------------------------------


async def populate(store: EventStore, total: int, stream_size: int, label: str) -> list[str]:
    """Append `total` events with our store, `stream_size` per stream, in batches, 8 in flight."""
    plan = [
        (f"bench.{label}-{s}", min(stream_size, total - start))
        for s, start in enumerate(range(0, total, stream_size))
    ]
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    batch = min(stream_size, 500)
    done = 0
    next_report = time.monotonic() + 5

    async def worker() -> None:
        nonlocal done, next_report
        while not queue.empty():
            stream, size = queue.get_nowait()
            written = 0
            while written < size:
                chunk = [new_event(written + i) for i in range(min(batch, size - written))]
                await store.append(stream, chunk, written if written else NO_STREAM)
                written += len(chunk)
                done += len(chunk)
            if time.monotonic() > next_report:
                progress(f"  populated {done:,}/{total:,}")
                next_report = time.monotonic() + 5

    await asyncio.gather(*(worker() for _ in range(8)))
    return [stream for stream, _ in plan]


async def populate_raw(
    js: JetStreamContext, prefix: str, total: int, stream_size: int, label: str
) -> None:
    """Fill a JetStream log fast for the read phases: pipelined `publish_async`, valid envelopes.

    Each stream is written in order by this one publisher, so versions are right without
    expected-sequence headers; the read phases measure reading, not this.
    """
    futures: list[asyncio.Future[Any]] = []
    next_report = time.monotonic() + 5
    for s, start in enumerate(range(0, total, stream_size)):
        stream = f"bench.{label}-{s}"
        subject = f"{prefix}.ev.{stream}"
        for i in range(min(stream_size, total - start)):
            event_id, body = wire_body(stream, i + 1, start + i)
            headers = {
                "Nats-Msg-Id": event_id,
                "Fuse-Type": TYPE,
                "Fuse-Schema-Version": "1",
                "Fuse-Stream-Version": str(i + 1),
            }
            futures.append(await js.publish_async(subject, body, headers=headers))
        if len(futures) >= 10_000:
            await asyncio.gather(*futures)
            futures.clear()
        if time.monotonic() > next_report:
            progress(f"  published {start + stream_size:,}/{total:,}")
            next_report = time.monotonic() + 5
    await asyncio.gather(*futures)


async def ours_read_all(store: EventStore, expected: int) -> int:
    count = 0
    async for event in store.read_all():
        if not isinstance(event.data, StateUpdate):
            raise AssertionError(f"read_all gave {type(event.data).__name__}, not StateUpdate")
        count += 1
    if count != expected:
        raise AssertionError(f"read_all read {count} events, {expected} were appended")
    return count


async def raw_ordered_push(js: JetStreamContext, prefix: str, expected: int) -> int:
    """The fastest nats-py reader: an ordered push consumer with a callback, typed decode."""
    done = asyncio.get_running_loop().create_future()
    count = 0

    async def on_message(msg: Msg) -> None:
        nonlocal count
        decode_typed(msg.data)
        count += 1
        if count == expected and not done.done():
            done.set_result(None)

    sub = await js.subscribe(f"{prefix}.ev.>", ordered_consumer=True, cb=on_message)
    try:
        await asyncio.wait_for(done, 600)
    finally:
        await sub.unsubscribe()
    return count


async def raw_pull_fetch(js: JetStreamContext, prefix: str, expected: int) -> int:
    """An ephemeral pull consumer without acks, `fetch(1000)` in a loop, typed decode."""
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
    sub = await js.pull_subscribe(f"{prefix}.ev.>", config=config)
    count = 0
    try:
        while count < expected:
            for msg in await sub.fetch(1000, timeout=10):
                decode_typed(msg.data)
                count += 1
    finally:
        await sub.unsubscribe()
    return count


async def bench_jetstream_read(url: str, nc: NatsClient, sizes: Sizes) -> None:
    prefix = f"br{run_id()}"
    js = nc.jetstream()
    store = await open_event_store(url, prefix=prefix)
    try:
        progress(f"jetstream read_all: publishing {sizes.read_events:,} events")
        await populate_raw(js, prefix, sizes.read_events, 1000, "read")
        n = sizes.read_events
        sides: dict[str, Callable[[], Awaitable[int]]] = {
            "ours": lambda: ours_read_all(store, n),
            "raw_ordered_push": lambda: raw_ordered_push(js, prefix, n),
            "raw_pull_fetch": lambda: raw_pull_fetch(js, prefix, n),
        }
        best = dict.fromkeys(sides, 0.0)
        await sides["ours"]()  # warm-up: one pass (it also warms the server's caches)
        for round_no in range(sizes.rounds):
            for key, side in sides.items():
                count, seconds = await timed(side)
                best[key] = max(best[key], count / seconds)
                progress(f"  round {round_no + 1} {key}: {count / seconds:,.0f} events/s")
    finally:
        await store.close()
    for key in ("raw_ordered_push", "raw_pull_fetch"):
        emit(
            f"jetstream.read_all.vs_{key.removeprefix('raw_')}",
            best["ours"],
            best[key],
            "events/s (read_all of the whole log with typed decode; baseline: nats-py "
            f"{'ordered push consumer' if key == 'raw_ordered_push' else 'pull fetch(1000)'} "
            "with the same decode)",
            n=n,
            lower_is_better=False,
        )


# -- SQLite vs eventsourcing -----------------------------------------------------------------------
#
# Baseline API: eventsourcing's SQLiteApplicationRecorder.insert_events with StoredEvent, one
# event per call. Its (originator_id, originator_version) primary key is the version check (a
# conflicting version raises IntegrityError), and the application recorder's rowid is a global
# order as our positions are: the same contract as "append one event to a stream with a version
# check", without an Application's aggregate, snapshot and transcoder work that we do not do.
# The datastore is the one PERSISTENCE_MODULE=eventsourcing.sqlite + SQLITE_DBNAME builds; it is
# constructed directly only to size its connection pool to the thread count (the factory fixes
# 5 + 10 overflow, which makes extra threads wait or reconnect). Its connections keep SQLite's
# default synchronous=FULL in WAL mode, as ours do: one fsync per commit on both sides.


class EventsourcingSide:
    """eventsourcing's SQLite recorder on its own database file."""

    def __init__(self, path: Path, pool_size: int) -> None:
        from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

        self.datastore = SQLiteDatastore(db_name=str(path), pool_size=pool_size, max_overflow=0)
        self.recorder = SQLiteApplicationRecorder(self.datastore)
        self.recorder.create_table()

    def synchronous(self) -> int:
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute("PRAGMA synchronous")
            value: int = cursor.fetchone()[0]
            return value

    def append_stream(self, stream_id: uuid.UUID, bodies: list[bytes], per_call: int) -> None:
        from eventsourcing.persistence import StoredEvent

        for start in range(0, len(bodies), per_call):
            self.recorder.insert_events(
                [
                    StoredEvent(
                        originator_id=stream_id,
                        originator_version=start + offset + 1,
                        topic=TYPE,
                        state=body,
                    )
                    for offset, body in enumerate(bodies[start : start + per_call])
                ]
            )

    def read_all(self, expected: int, page: int = 1000) -> int:
        count = 0
        start = 1
        while True:
            notifications = self.recorder.select_notifications(start=start, limit=page)
            if not notifications:
                break
            for notification in notifications:
                decode_typed(notification.state)
                count += 1
            start = notifications[-1].id + 1
        if count != expected:
            raise AssertionError(f"eventsourcing read {count} events, {expected} were stored")
        return count

    def read_streams(self, stream_ids: list[uuid.UUID]) -> int:
        count = 0
        for stream_id in stream_ids:
            for stored in self.recorder.select_events(stream_id):
                decode_typed(stored.state)
                count += 1
        return count

    def close(self) -> None:
        self.datastore.close()


def journal_mode(path: Path) -> str:
    """The journal mode stored in a database file (synchronous is per connection, see above)."""
    with sqlite3.connect(path) as connection:
        mode: str = connection.execute("PRAGMA journal_mode").fetchone()[0]
    return mode


async def ours_sqlite_append(store: EventStore, appenders: int, total: int) -> tuple[int, float]:
    return await ours_append_concurrent(store, appenders, total)


async def es_sqlite_append(
    side: EventsourcingSide, appenders: int, total: int
) -> tuple[int, float]:
    """`appenders` threads, each appending one event per call to its own stream."""
    per = max(1, total // appenders)
    rid = run_id()
    streams = [uuid.uuid4() for _ in range(appenders)]
    bodies = [
        [wire_body(f"bench.{rid}-{s}", i + 1, s * per + i)[1] for i in range(per)]
        for s in range(appenders)
    ]

    def run_threads() -> int:
        with ThreadPoolExecutor(appenders) as pool:
            futures = [
                pool.submit(side.append_stream, streams[s], bodies[s], 1) for s in range(appenders)
            ]
            for future in futures:
                future.result()
        return per * appenders

    async def run() -> int:
        return await asyncio.to_thread(run_threads)

    return await timed(run)


async def bench_sqlite_append(workdir: Path, sizes: Sizes) -> None:
    ours_path = workdir / "ours-append.db"
    es_path = workdir / "es-append.db"
    store = await open_event_store(f"sqlite://{ours_path}")
    es = EventsourcingSide(es_path, pool_size=sizes.sqlite_appenders)
    try:
        progress(
            f"sqlite: journal {journal_mode(ours_path)} (ours) / "
            f"{journal_mode(es_path)} (eventsourcing), eventsourcing synchronous="
            f"{es.synchronous()} (2 = FULL), ours synchronous="
            f"{getattr(store, 'synchronous', '?')}"
        )
        for label, appenders, total in (
            ("concurrent", sizes.sqlite_appenders, sizes.sqlite_append_events),
            ("single", 1, sizes.sqlite_single_events),
        ):
            progress(f"sqlite append {label}: {appenders} appender(s), {total} events per round")
            await ours_sqlite_append(store, appenders, max(appenders, total // 10))
            await es_sqlite_append(es, appenders, max(appenders, total // 10))
            best = {"ours": 0.0, "eventsourcing": 0.0}
            for round_no in range(sizes.rounds):
                for key in best:
                    if key == "ours":
                        count, seconds = await ours_sqlite_append(store, appenders, total)
                    else:
                        count, seconds = await es_sqlite_append(es, appenders, total)
                    best[key] = max(best[key], count / seconds)
                    progress(f"  round {round_no + 1} {key}: {count / seconds:,.0f} events/s")
            emit(
                f"sqlite.append.{label}",
                best["ours"],
                best["eventsourcing"],
                f"events/s ({appenders} appender(s), 1 event per append, expected version, "
                "synchronous=FULL; baseline: eventsourcing SQLiteApplicationRecorder)",
                n=total,
                lower_is_better=False,
            )
    finally:
        await store.close()
        es.close()


async def bench_sqlite_read(workdir: Path, sizes: Sizes) -> None:
    progress(f"sqlite read: populating {sizes.sqlite_read_events:,} events on each side")
    ours_path = workdir / "ours-read.db"
    es_path = workdir / "es-read.db"
    store = await open_event_store(f"sqlite://{ours_path}")
    es = EventsourcingSide(es_path, pool_size=2)
    try:
        size = sizes.sqlite_stream_size
        streams = await populate(store, sizes.sqlite_read_events, size, "read")
        stream_ids = [uuid.uuid4() for _ in streams]
        for stream, stream_id in zip(streams, stream_ids, strict=True):
            bodies = [wire_body(stream, i + 1, i)[1] for i in range(size)]
            await asyncio.to_thread(es.append_stream, stream_id, bodies, min(size, 500))
        n = sizes.sqlite_read_events

        async def ours_streams() -> int:
            count = 0
            for stream in streams:
                async for event in store.read(stream):
                    if not isinstance(event.data, StateUpdate):
                        raise AssertionError("read gave an untyped payload")
                    count += 1
            return count

        sides: dict[str, dict[str, Callable[[], Awaitable[int]]]] = {
            "read_all": {
                "ours": lambda: ours_read_all(store, n),
                "eventsourcing": lambda: asyncio.to_thread(es.read_all, n),
            },
            "read_stream": {
                "ours": ours_streams,
                "eventsourcing": lambda: asyncio.to_thread(es.read_streams, stream_ids),
            },
        }
        for label, pair in sides.items():
            for side in pair.values():
                await side()
            best = dict.fromkeys(pair, 0.0)
            for round_no in range(sizes.rounds):
                for key, side in pair.items():
                    count, seconds = await timed(side)
                    if count != n:
                        raise AssertionError(f"{label} {key} read {count} of {n} events")
                    best[key] = max(best[key], count / seconds)
                    progress(f"  {label} round {round_no + 1} {key}: {count / seconds:,.0f} ev/s")
            what = (
                "read_all of the whole log, pages of 1000 for eventsourcing's select_notifications"
                if label == "read_all"
                else f"every stream of {size} events read in full; baseline: select_events"
            )
            emit(
                f"sqlite.{label}",
                best["ours"],
                best["eventsourcing"],
                f"events/s ({what}; typed decode on both sides)",
                n=n,
                lower_is_better=False,
            )
    finally:
        await store.close()
        es.close()


# -- replay memory, measured in a child process per backend ----------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def child_replay(url: str, prefix: str, expected: int, mark: int) -> None:
    """Child process: replay the whole log once, report peak RSS at `mark` and at the end."""
    store = await open_event_store(url, prefix=prefix)
    at_open = peak_rss_mb()
    at_mark = 0.0
    count = 0
    start = time.perf_counter()
    try:
        async for event in store.read_all():
            if not isinstance(event.data, StateUpdate):
                raise AssertionError("replay gave an untyped payload")
            count += 1
            if count == mark:
                at_mark = peak_rss_mb()
    finally:
        await store.close()
    seconds = time.perf_counter() - start
    report = {
        "count": count,
        "at_open_mb": at_open,
        "at_mark_mb": at_mark,
        "at_end_mb": peak_rss_mb(),
        "rate": count / seconds,
    }
    print(json.dumps(report), flush=True)


def run_child_replay(url: str, prefix: str, expected: int, mark: int) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-replay",
        url,
        "--prefix",
        prefix,
        "--events",
        str(expected),
        "--mark",
        str(mark),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"replay child failed ({done.returncode}):\n{done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


async def bench_replay(
    label: str, url: str, prefix: str, sizes: Sizes, js: JetStreamContext | None = None
) -> None:
    total = sizes.replay_events
    mark = total // 10
    progress(f"{label} replay: populating {total:,} events")
    store = await open_event_store(url, prefix=prefix)  # it also provisions the JetStream stream
    try:
        if js is not None:
            await populate_raw(js, prefix, total, 1000, "replay")
        else:
            await populate(store, total, 1000, "replay")
    finally:
        await store.close()
    progress(f"{label} replay: reading {total:,} events in a child process")
    report = await asyncio.to_thread(run_child_replay, url, prefix, total, mark)
    if report["count"] != total:
        raise AssertionError(f"{label} replay read {report['count']} of {total} events")
    progress(
        f"  {label} replay: {report['rate']:,.0f} events/s; peak RSS {report['at_open_mb']:.1f} MB "
        f"after open, {report['at_mark_mb']:.1f} MB at {mark:,}, {report['at_end_mb']:.1f} MB at "
        f"{total:,}"
    )
    emit(
        f"{label}.replay.peak_rss",
        report["at_end_mb"],
        report["at_mark_mb"],
        f"MB peak RSS of a child replaying with read_all (ours: after all {total:,} events; "
        f"baseline: after the first {mark:,}; ratio = baseline/ours, 1.0 = flat)",
        n=total,
        lower_is_better=True,
    )


# -- main ------------------------------------------------------------------------------------------


SQLITE_PHASES = ("sqlite", "sqlite.append", "sqlite.read")
"""What `--only` accepts: every SQLite line, or only its append or read lines."""


# -- JetStream on a 3-node cluster -------------------------------------------------------------


async def cluster_append_rate(
    cluster: NatsCluster, sizes: Sizes, replicas: int, *, raw: bool
) -> dict[str, float]:
    """Best append rates of our store (and raw publish_async when `raw`) on an R`replicas`
    stream of its own, same streams in flight and bytes as the single-server line."""
    prefix = f"bc{run_id()}"
    store = await open_event_store(cluster.url, prefix=prefix, replicas=replicas)
    nc = await nats.connect(cluster.urls)
    try:
        js = nc.jetstream()
        template = await capture_headers(store, nc, prefix)
        sides: dict[str, Side] = {"ours": lambda n: ours_append_concurrent(store, sizes.streams, n)}
        if raw:
            sides["raw"] = lambda n: raw_append_concurrent(
                js, prefix, template, sizes.streams, n, use_async=True
            )
        best = await best_rates(sides, sizes, sizes.cluster_events, f"R{replicas} ")
        await nc.request(f"$JS.API.STREAM.DELETE.{prefix.upper()}_EVENTS", b"", timeout=10)
    finally:
        await store.close()
        await nc.close()
    return best


async def cluster_leader_kill(cluster: NatsCluster, sizes: Sizes) -> None:
    """The longest append wait of 8 appenders while the stream leader is SIGKILLed (and
    restarted), against the election time: from the kill to the first append acknowledged
    after it (what the stream was unavailable for, as any client saw it)."""
    prefix = f"bk{run_id()}"
    store = await open_event_store(cluster.url, prefix=prefix, replicas=3)
    stream_name = f"{prefix.upper()}_EVENTS"
    waits: list[float] = []
    acked: list[float] = []
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def appender(index: int) -> None:
        version = 0
        while not stop.is_set():
            started = time.perf_counter()
            try:
                version = (
                    await store.append(f"kill.a{index}", new_event(version), version)
                ).version
            except Exception as error:  # reported in the line: the target is none
                errors.append(error)
                return
            acked.append(time.perf_counter())
            waits.append(acked[-1] - started)
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(appender(index)) for index in range(8)]
    try:
        await asyncio.sleep(sizes.cluster_kill_seconds / 4)
        leader = await cluster.stream_leader(stream_name)
        killed = time.perf_counter()
        await leader.kill()
        successor = await cluster.stream_leader(stream_name, timeout=30)
        progress(f"  leader {leader.server_name} killed; {successor.server_name} leads")
        await asyncio.sleep(sizes.cluster_kill_seconds / 2)
        await leader.restart()
        await asyncio.sleep(sizes.cluster_kill_seconds / 4)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await store.close()
    await cluster.heal()
    # acknowledgements already on their way when the leader died land within milliseconds
    election = min((t for t in acked if t > killed + 0.05), default=killed) - killed
    emit(
        "cluster.append.leader_kill.longest_wait",
        max(waits),
        election + 1.0,
        "seconds (longest append wait, 8 appenders, stream leader SIGKILLed; baseline: the "
        "election time + 1 s, the target)",
        n=len(waits),
        lower_is_better=True,
        election_seconds=round(election, 3),
        errors=len(errors),
    )


async def bench_cluster(workdir: Path, sizes: Sizes) -> None:
    """Cluster lines: R3 append vs raw publish on the same R3 stream, R1 and R3 with
    `sync_interval: always` for the README, and the longest append wait during a leader kill."""
    progress(f"cluster: 3 nodes, {sizes.streams} streams in flight, {sizes.cluster_events} events")
    async with NatsCluster(size=3, data_dir=workdir / "cluster") as cluster:
        r3 = await cluster_append_rate(cluster, sizes, 3, raw=True)
        emit(
            "cluster.append.r3",
            r3["ours"],
            r3["raw"],
            f"events/s (3-node cluster, R3 stream, {sizes.streams} streams in flight, expected "
            "version; baseline: nats-py publish_async to the same R3 stream)",
            n=sizes.cluster_events,
            lower_is_better=False,
        )
        r1 = await cluster_append_rate(cluster, sizes, 1, raw=False)
        emit(
            "cluster.append.r1_vs_r3",
            r1["ours"],
            r3["ours"],
            "events/s (our store: R1 stream on the cluster; baseline: R3, same run)",
            n=sizes.cluster_events,
            lower_is_better=False,
        )
        await cluster_leader_kill(cluster, sizes)
    config = workdir / "sync-always.conf"
    config.write_text("jetstream { sync_interval: always }\n")
    async with NatsCluster(
        size=3, data_dir=workdir / "cluster-sync", extra_args=["-c", str(config)]
    ) as cluster:
        always = await cluster_append_rate(cluster, sizes, 3, raw=False)
    emit(
        "cluster.append.r3_sync_always",
        always["ours"],
        r3["ours"],
        "events/s (our store: R3 with sync_interval: always, an fsync per write on every node; "
        "baseline: R3 with the default 2 min sync interval)",
        n=sizes.cluster_events,
        lower_is_better=False,
    )


async def main_sqlite(sizes: Sizes, only: str) -> None:
    """Only the SQLite lines (no nats-server): append and read, and the replay when `sqlite`."""
    workdir = Path(tempfile.mkdtemp(prefix="newfuse-bench-"))
    try:
        progress(f"only {only}: files in {workdir}")
        if only in ("sqlite", "sqlite.append"):
            await bench_sqlite_append(workdir, sizes)
        if only in ("sqlite", "sqlite.read"):
            await bench_sqlite_read(workdir, sizes)
        if only == "sqlite":
            await bench_replay("sqlite", f"sqlite://{workdir / 'replay.db'}", "fuse", sizes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    progress("done")


async def main_cluster(sizes: Sizes) -> None:
    """Only the cluster lines."""
    workdir = Path(tempfile.mkdtemp(prefix="newfuse-bench-"))
    try:
        await bench_cluster(workdir, sizes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    progress("done")


async def main(sizes: Sizes) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="newfuse-bench-"))
    try:
        async with NatsServer(data_dir=workdir / "nats") as server:
            progress(f"nats-server at {server.url}, files in {workdir}")
            nc = await nats.connect(server.url)
            try:
                prefix = f"ba{run_id()}"
                store = await open_event_store(server.url, prefix=prefix)
                try:
                    js = nc.jetstream()
                    template = await capture_headers(store, nc, prefix)
                    await bench_jetstream_append(store, js, prefix, template, sizes)
                    await bench_jetstream_latency(store, js, prefix, template, sizes)
                finally:
                    await store.close()
                await bench_jetstream_read(server.url, nc, sizes)
                await bench_sqlite_append(workdir, sizes)
                await bench_sqlite_read(workdir, sizes)
                await bench_replay("jetstream", server.url, f"bm{run_id()}", sizes, nc.jetstream())
                await bench_replay("sqlite", f"sqlite://{workdir / 'replay.db'}", "fuse", sizes)
            finally:
                await nc.close()
        await bench_cluster(workdir, sizes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    progress("done")


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark (or, internally, one replay child)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (a few seconds)")
    parser.add_argument(
        "--only",
        choices=(*SQLITE_PHASES, "cluster"),
        help="run only these SQLite lines (sqlite: append, read and replay), without nats-server",
    )
    parser.add_argument("--child-replay", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="fuse", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mark", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_replay:
        run_benchmark(child_replay(args.child_replay, args.prefix, args.events, args.mark))
        return
    sizes = QUICK if args.quick else FULL
    if args.only == "cluster":
        run_benchmark(main_cluster(sizes))
        return
    run_benchmark(main_sqlite(sizes, args.only) if args.only else main(sizes))


if __name__ == "__main__":
    cli()
