"""Audit trail benchmark: `verify` and `checkpoint` of the log's Merkle tree against reading and
hashing the same messages raw.

One run starts one embedded nats-server and writes one SQLite file. Lines (JSON, keys name,
ours, baseline, unit, ratio, n; ratio = ours / baseline, higher is better):
- `audit.verify.jetstream`: messages/s that `security.verify` recomputes (every leaf from
  position 1, checked against the checkpoints' prefixes and signed roots); the baseline is a
  nats-py ordered push consumer that SHA-256es each message's data, nothing else.
- `audit.checkpoint.jetstream`: messages/s that `security.checkpoint` covers, signing included,
  against the same baseline.
- `audit.verify.sqlite`: the same on a SQLite store; the baseline is `sqlite3` selecting the
  bodies in pages of 1000 and SHA-256ing each.

Usage: `python benchmarks/audit.py [--quick]`.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import nats
from _events import populate, populate_raw
from _harness import emit, parser, progress, run_benchmark, run_id, sizes_of, timed, workdir
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from newfuse.eventstore import EventStore, open_event_store
from newfuse.nats import NatsServer
from newfuse.security import SigningKey, checkpoint, verify


async def raw_hash_push(js: JetStreamContext, prefix: str, expected: int) -> int:
    """An ordered push consumer with a callback that hashes each message's data."""
    done = asyncio.get_running_loop().create_future()
    count = 0

    async def on_message(msg: Msg) -> None:
        nonlocal count
        hashlib.sha256(msg.data).digest()
        count += 1
        if count == expected and not done.done():
            done.set_result(None)

    sub = await js.subscribe(f"{prefix}.ev.>", ordered_consumer=True, cb=on_message)
    try:
        await asyncio.wait_for(done, 600)
    finally:
        await sub.unsubscribe()
    return count


def raw_hash_sqlite(path: Path) -> int:
    connection = sqlite3.connect(path)
    count, last = 0, 0
    try:
        while True:
            rows = connection.execute(
                "SELECT position, body FROM events WHERE position > ? ORDER BY position LIMIT 1000",
                (last,),
            ).fetchall()
            if not rows:
                return count
            for position, body in rows:
                hashlib.sha256(body).digest()
                last = position
            count += len(rows)
    finally:
        connection.close()


async def ours_verify(store: EventStore, key: SigningKey, expected: int) -> int:
    report = await verify(store, [key.verifier])
    if not report.ok or report.records < expected:
        raise AssertionError(f"verify: {report.summary()}")
    return report.records


async def bench_jetstream(url: str, events: int) -> None:
    prefix = f"ba{run_id()}"
    nc = await nats.connect(url)
    store = await open_event_store(url, prefix=prefix)
    key = SigningKey.generate("bench")
    try:
        progress(f"jetstream: publishing {events:,} events")
        await store.head_position()  # provisions the stream
        await populate_raw(nc.jetstream(), prefix, events, 1000, "audit")
        progress("jetstream: checkpoint (ours) and the raw read-and-hash baseline")
        js = nc.jetstream()
        covered, seconds = await timed(
            lambda: _covered(store, key)  # the first checkpoint reads the whole log
        )
        base_count, base_seconds = await timed(lambda: raw_hash_push(js, prefix, events))
        emit(
            "audit.checkpoint.jetstream",
            covered / seconds,
            base_count / base_seconds,
            "messages/s (checkpoint of the whole log vs ordered push + sha256)",
            n=events,
            lower_is_better=False,
        )
        progress("jetstream: verify (ours) and the baseline again")
        checked, seconds = await timed(lambda: ours_verify(store, key, events))
        base_count, base_seconds = await timed(lambda: raw_hash_push(js, prefix, events))
        emit(
            "audit.verify.jetstream",
            checked / seconds,
            base_count / base_seconds,
            "messages/s (verify vs ordered push + sha256)",
            n=checked,
            lower_is_better=False,
        )
    finally:
        await store.close()
        await nc.jetstream().delete_stream(store.stream_name)  # type: ignore[attr-defined]
        await nc.close()


async def _covered(store: EventStore, key: SigningKey) -> int:
    written = await checkpoint(store, key)
    return written.checkpoints[-1].size if written.checkpoints else 0


async def bench_sqlite(folder: Path, events: int) -> None:
    path = folder / "audit.db"
    store = await open_event_store(f"sqlite://{path}")
    key = SigningKey.generate("bench")
    try:
        progress(f"sqlite: appending {events:,} events")
        await populate(store, events, 500, "audit")
        await checkpoint(store, key)
        progress("sqlite: verify (ours) and the raw select-and-hash baseline")
        checked, seconds = await timed(lambda: ours_verify(store, key, events))
        base_count, base_seconds = await timed(lambda: asyncio.to_thread(raw_hash_sqlite, path))
        emit(
            "audit.verify.sqlite",
            checked / seconds,
            base_count / base_seconds,
            "messages/s (verify vs sqlite3 pages + sha256)",
            n=checked,
            lower_is_better=False,
        )
    finally:
        await store.close()


async def main() -> None:
    args = parser(__doc__).parse_args()
    sizes = sizes_of(args)
    async with workdir("audit") as folder, NatsServer(data_dir=folder / "nats") as server:
        await bench_jetstream(server.url, sizes.read_events)
        await bench_sqlite(folder, sizes.sqlite_read_events)
    progress("done")


if __name__ == "__main__":
    run_benchmark(main())
