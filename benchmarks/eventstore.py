"""Event store benchmarks: every measured path, one after the other (what `make bench` runs).

Each path is its own script (jetstream_append, jetstream_read, sqlite_store, replay, cluster) and
runs alone too; every measurement runs our code and its baseline on the same server, with the same
payload bytes and the same concurrency, after a warm-up, in alternating rounds (the best round of
each side is kept). Progress goes to stderr; results go to stdout as JSON lines with the keys
name, ours, baseline, unit, ratio and n, where ratio is ours / baseline for throughput and
baseline / ours for latency and memory (so higher is always better).

Usage: `python benchmarks/eventstore.py [--quick] [--only sqlite|sqlite.append|sqlite.read|cluster]`
(see benchmarks/README.md).
"""

from __future__ import annotations

import cluster
import jetstream_append
import jetstream_read
import replay
import sqlite_store
from _harness import Sizes, parser, progress, run_benchmark, sizes_of

SQLITE_PHASES = ("sqlite", "sqlite.append", "sqlite.read")
"""What `--only` accepts: every SQLite line, or only its append or read lines (no nats-server)."""


async def main(sizes: Sizes, only: str | None) -> None:
    if only is None:
        await jetstream_append.main(sizes)
        await jetstream_read.main(sizes)
        await sqlite_store.main(sizes)
        await replay.main(sizes)
        await cluster.main(sizes)
    elif only == "cluster":
        await cluster.main(sizes)
    else:
        part = only.partition(".")[2]
        await sqlite_store.main(sizes, (part,) if part else sqlite_store.PARTS)
        if only == "sqlite":
            await replay.main(sizes, ("sqlite",))
    progress("done")


if __name__ == "__main__":
    command = parser(__doc__)
    command.add_argument(
        "--only",
        choices=(*SQLITE_PHASES, "cluster"),
        help="run only these SQLite lines, or only the 3-node cluster lines",
    )
    args = command.parse_args()
    run_benchmark(main(sizes_of(args), args.only))
