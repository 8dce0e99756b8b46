"""Cluster benchmark: our store on a real 3-node JetStream cluster next to raw nats-py.

R3 append throughput against raw publish_async to the same R3 stream, R1 and R3 with
`sync_interval: always` (what replicas and fsyncs cost, for the README), and the longest append
wait of 8 appenders while the stream leader is SIGKILLed, against the election time + 1 s.
Usage: `python benchmarks/cluster.py [--quick]` (see benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
from _events import capture_headers, new_event, ours_append_concurrent
from _harness import Sizes, emit, parser, progress, run_benchmark, run_id, sizes_of, workdir
from jetstream_append import Side, best_rates, raw_append_concurrent

from newfuse.eventstore import open_event_store
from newfuse.nats.cluster import NatsCluster


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


async def main(sizes: Sizes) -> None:
    """Cluster lines: R3 append vs raw publish on the same R3 stream, R1 and R3 with
    `sync_interval: always` for the README, and the longest append wait during a leader kill."""
    async with workdir("cluster") as path:
        await _lines(path, sizes)


async def _lines(path: Path, sizes: Sizes) -> None:
    progress(f"cluster: 3 nodes, {sizes.streams} streams in flight, {sizes.cluster_events} events")
    async with NatsCluster(size=3, data_dir=path / "cluster") as cluster:
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
    config = path / "sync-always.conf"
    config.write_text("jetstream { sync_interval: always }\n")
    async with NatsCluster(
        size=3, data_dir=path / "cluster-sync", extra_args=["-c", str(config)]
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


if __name__ == "__main__":
    run_benchmark(main(sizes_of(parser(__doc__).parse_args())))
