"""JetStream read benchmark: our `read_all` next to nats-py's ordered push and pull consumers.

Usage: `python benchmarks/jetstream_read.py [--quick]` (see benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats
from _events import decode_typed, ours_read_all, populate_raw
from _harness import Sizes, emit, parser, progress, run_benchmark, run_id, sizes_of, timed, workdir
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from newfuse.eventstore import open_event_store
from newfuse.nats import NatsServer


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


async def main(sizes: Sizes) -> None:
    async with workdir("read") as path, NatsServer(data_dir=path / "nats") as server:
        progress(f"nats-server at {server.url}")
        nc = await nats.connect(server.url)
        try:
            await bench_jetstream_read(server.url, nc, sizes)
        finally:
            await nc.close()


if __name__ == "__main__":
    run_benchmark(main(sizes_of(parser(__doc__).parse_args())))
