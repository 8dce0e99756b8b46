"""JetStream append benchmark: our store's appends next to raw nats-py publishes.

Throughput with many streams in flight, and the latency of sequential appends to one stream, on
one embedded nats-server, with the same subjects, bytes and headers (captured from our store).
Usage: `python benchmarks/jetstream_append.py [--quick]` (see benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
from _events import HeaderTemplate, capture_headers, new_event, ours_append_concurrent, wire_body
from _harness import (
    Sizes,
    emit,
    parser,
    percentile,
    progress,
    run_benchmark,
    run_id,
    sizes_of,
    timed,
    workdir,
)
from nats.js import JetStreamContext

from newfuse.eventstore import EventStore, open_event_store
from newfuse.nats import NatsServer


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
    sides: dict[str, Side], sizes: Sizes, events: int, label: str = ""
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
    best = await best_rates(sides, sizes, sizes.append_events)
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


async def main(sizes: Sizes) -> None:
    async with workdir("append") as path, NatsServer(data_dir=path / "nats") as server:
        progress(f"nats-server at {server.url}")
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
        finally:
            await nc.close()


if __name__ == "__main__":
    run_benchmark(main(sizes_of(parser(__doc__).parse_args())))
