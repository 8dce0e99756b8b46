"""Replay memory benchmark: the peak RSS of a child process replaying a whole log, per backend.

Usage: `python benchmarks/replay.py [--quick] [--backend jetstream|sqlite]` (see
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nats
from _events import populate, populate_raw
from _harness import (
    Sizes,
    emit,
    parser,
    peak_rss_mb,
    progress,
    report,
    run_benchmark,
    run_child,
    run_id,
    sizes_of,
    workdir,
)
from nats.js import JetStreamContext

from newfuse.eventstore import open_event_store
from newfuse.nats import NatsServer
from newfuse.schemas import StateUpdate

SCRIPT = str(Path(__file__).resolve())
BACKENDS = ("jetstream", "sqlite")


async def child_replay(url: str, prefix: str, mark: int) -> None:
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
    report(
        {
            "count": count,
            "at_open_mb": at_open,
            "at_mark_mb": at_mark,
            "at_end_mb": peak_rss_mb(),
            "rate": count / seconds,
        }
    )


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
    result = await run_child(
        SCRIPT, "--child-replay", url, "--prefix", prefix, "--mark", str(mark), timeout=1800
    )
    if result["count"] != total:
        raise AssertionError(f"{label} replay read {result['count']} of {total} events")
    progress(
        f"  {label} replay: {result['rate']:,.0f} events/s; peak RSS {result['at_open_mb']:.1f} MB "
        f"after open, {result['at_mark_mb']:.1f} MB at {mark:,}, {result['at_end_mb']:.1f} MB at "
        f"{total:,}"
    )
    emit(
        f"{label}.replay.peak_rss",
        result["at_end_mb"],
        result["at_mark_mb"],
        f"MB peak RSS of a child replaying with read_all (ours: after all {total:,} events; "
        f"baseline: after the first {mark:,}; ratio = baseline/ours, 1.0 = flat)",
        n=total,
        lower_is_better=True,
    )


async def main(sizes: Sizes, backends: tuple[str, ...] = BACKENDS) -> None:
    async with workdir("replay") as path:
        if "jetstream" in backends:
            async with NatsServer(data_dir=path / "nats") as server:
                nc = await nats.connect(server.url)
                try:
                    await bench_replay(
                        "jetstream", server.url, f"bm{run_id()}", sizes, nc.jetstream()
                    )
                finally:
                    await nc.close()
        if "sqlite" in backends:
            await bench_replay("sqlite", f"sqlite://{path / 'replay.db'}", "fuse", sizes)


if __name__ == "__main__":
    command = parser(__doc__)
    command.add_argument("--backend", choices=BACKENDS, help="only this backend's line")
    command.add_argument("--child-replay", metavar="URL", help=argparse.SUPPRESS)
    command.add_argument("--prefix", default="fuse", help=argparse.SUPPRESS)
    command.add_argument("--mark", type=int, default=0, help=argparse.SUPPRESS)
    args = command.parse_args()
    if args.child_replay:
        run_benchmark(child_replay(args.child_replay, args.prefix, args.mark))
    else:
        run_benchmark(main(sizes_of(args), (args.backend,) if args.backend else BACKENDS))
