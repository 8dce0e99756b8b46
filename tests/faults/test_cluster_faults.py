"""The JetStream store on a real 3-node cluster under load, through node faults: SIGKILL of the
stream leader, SIGKILL of a follower (each restarted), SIGSTOP/SIGCONT of the leader. Eight
appenders over 64 streams see no error; every acknowledged event is stored once, at contiguous
versions; a live subscriber and a projection runner see every event once, in order."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from newfuse.eventstore import NO_STREAM, EventFilter, Subscription
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats.cluster import NatsCluster
from newfuse.nats.embedded import NatsServer
from newfuse.projections import (
    Projection,
    ProjectionRunner,
    SQLiteBatch,
    SQLiteReadModel,
    projection_status,
)
from newfuse.schemas import NewEvent, RecordedEvent
from support import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

APPENDERS = 8
STREAMS_EACH = 8
ELECTION_TIMEOUT = 20.0


@dataclass
class Load:
    """What the appenders were told: acknowledged ids per stream, in version order."""

    acked: dict[str, list[str]] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    longest_wait: float = 0.0
    appends: int = 0


async def _appender(
    store: JetStreamEventStore, index: int, load: Load, stop: asyncio.Event
) -> None:
    rng = random.Random(index)
    streams = [f"load.a{index}-{n}" for n in range(STREAMS_EACH)]
    versions = dict.fromkeys(streams, 0)
    while not stop.is_set():
        stream = rng.choice(streams)
        size = 3 if rng.random() < 0.2 else 1  # some atomic batches
        events = [NewEvent(type="note", data={"n": load.appends}) for _ in range(size)]
        started = time.monotonic()
        try:
            result = await store.append(stream, events, versions[stream] or NO_STREAM)
        except Exception as error:  # no error may reach an appender: recorded, asserted
            load.errors.append(error)
            return
        waited = time.monotonic() - started
        load.longest_wait = max(load.longest_wait, waited)
        load.appends += 1
        if result.first_version != versions[stream] + 1:
            load.errors.append(AssertionError(f"{stream}: {result} after {versions[stream]}"))
            return
        versions[stream] += size
        load.acked.setdefault(stream, []).extend(event.id for event in events)
        load.positions.extend(range(result.first_position, result.last_position + 1))
        await asyncio.sleep(0.005)


def _recorder() -> Projection[SQLiteBatch]:
    projection: Projection[SQLiteBatch] = Projection(
        "seen",
        setup=lambda batch: batch.execute(f"CREATE TABLE {batch.table('seen')} (position INT)"),
    )

    @projection.on("note")
    async def _apply(event: RecordedEvent, batch: SQLiteBatch) -> None:
        await batch.execute(f"INSERT INTO {batch.table('seen')} VALUES (?)", (event.position,))

    return projection


@pytest.fixture
async def store(healthy_cluster: NatsCluster, prefix: str) -> AsyncIterator[JetStreamEventStore]:
    opened = await JetStreamEventStore.connect(
        healthy_cluster.url, prefix=prefix, replicas=3, election_timeout=ELECTION_TIMEOUT
    )
    yield opened
    await opened.close()
    await _delete_stream(healthy_cluster, prefix)


async def _delete_stream(cluster: NatsCluster, prefix: str) -> None:
    """The next tests share the cluster: leave no R3 stream behind to replicate."""
    cleaner = await JetStreamEventStore.connect(cluster.live_url(), prefix=prefix)
    try:
        await cleaner.nc.request(f"$JS.API.STREAM.DELETE.{cleaner.stream_name}", b"", timeout=5)
    finally:
        await cleaner.close()


async def _under_load(
    cluster: NatsCluster,
    store: JetStreamEventStore,
    tmp_path: Path,
    fault: Callable[[NatsServer], Awaitable[None]],
    pick: str,
) -> None:
    """Run the load, apply `fault` to the stream leader or a follower (`pick`), check all."""
    await store.append("load.warm", NewEvent(type="warm", data={}))  # the stream exists
    load, stop = Load(), asyncio.Event()
    seen: list[int] = []
    silence = [0.0, time.monotonic()]  # the subscriber's longest wait between events, its last

    async def subscriber() -> None:
        async with store.subscribe(EventFilter(types=("note",))) as live:
            async for event in live:
                seen.append(event.position)
                now = time.monotonic()
                silence[0] = max(silence[0], now - silence[1])
                silence[1] = now

    model = await SQLiteReadModel.open(str(tmp_path / "model.db"))
    runner = ProjectionRunner(_recorder(), store, model, batch_size=100)
    watching = asyncio.create_task(subscriber())
    appenders = [
        asyncio.create_task(_appender(store, index, load, stop)) for index in range(APPENDERS)
    ]
    try:
        async with runner:
            await wait_for(lambda: _more(load, 200), timeout=20)
            leader = await cluster.stream_leader(store.stream_name)
            node = leader if pick == "leader" else next(n for n in cluster if n is not leader)
            before = load.appends
            await fault(node)
            # the load goes on through the fault and after it
            await wait_for(lambda: _more(load, before + 300), timeout=40)
            stop.set()
            await asyncio.gather(*appenders)
            assert load.errors == [], load.errors[:3]
            head = max(load.positions)
            await runner.wait_until(head, timeout=30)

            async def caught_up() -> bool:
                return bool(seen) and seen[-1] >= head

            await wait_for(caught_up, timeout=30)
            rows = await model.connection.execute_fetchall(
                "SELECT position FROM seen_seen ORDER BY rowid"
            )
            # status names the node the runner's consumer sits on now (a live one, after
            # the fault)
            placed = (await projection_status(runner.name, store, model)).server
            assert placed in {n.server_name for n in cluster if n.running}, placed
    finally:
        stop.set()
        for task in (*appenders, watching):
            task.cancel()
        await asyncio.gather(*appenders, watching, return_exceptions=True)
        await model.close()
    # what the store holds: every acknowledged id once, at contiguous versions
    lost = duplicated = stored_count = 0
    for stream, ids in load.acked.items():
        stored = [event async for event in store.read(stream)]
        stored_count += len(stored)
        assert [event.version for event in stored] == list(range(1, len(stored) + 1)), stream
        counts = Counter(event.id for event in stored)
        duplicated += sum(count - 1 for count in counts.values())
        lost += sum(1 for event_id in ids if event_id not in counts)
        assert [event.id for event in stored] == ids, stream
    acked = sorted(load.positions)
    print(
        f"\n{pick} fault: {len(acked)} acknowledged, {stored_count} stored, {lost} lost, "
        f"{duplicated} duplicated; longest append wait {load.longest_wait:.2f}s; "
        f"{store.elections_ridden} attempts ridden out; longest subscriber silence "
        f"{silence[0]:.2f}s"
    )
    assert (lost, duplicated, stored_count) == (0, 0, len(acked))
    assert len(set(acked)) == len(acked)
    notes = [position for position in seen if position <= acked[-1]]
    assert notes == acked, "the live subscriber saw a gap, a duplicate or another order"
    assert [row[0] for row in rows if row[0] <= acked[-1]] == acked, "the projection runner"
    assert load.longest_wait < ELECTION_TIMEOUT
    # the subscriber recovers once the servers answer again, within the election bound (its
    # silence is printed above: ~1-3 s on an idle machine, up to ~6 s seen on a loaded 2-core
    # one after a follower kill; a tighter bound here failed CI-like runs, so it is a figure to
    # read, and the bound only catches a feed that never comes back)
    assert silence[0] < ELECTION_TIMEOUT


async def _more(load: Load, appends: int) -> bool:
    return load.appends >= appends or bool(load.errors)


async def _kill_and_restart(node: NatsServer) -> None:
    await node.kill()
    await asyncio.sleep(2.0)  # the load runs on without it (an election when it led)
    await node.restart()


async def _pause_and_resume(node: NatsServer) -> None:
    node.pause()
    await asyncio.sleep(5.0)  # longer than an election: the others choose a new leader
    node.resume()


async def test_killing_the_stream_leader_under_load_loses_and_repeats_nothing(
    healthy_cluster: NatsCluster, store: JetStreamEventStore, tmp_path: Path
) -> None:
    await _under_load(healthy_cluster, store, tmp_path, _kill_and_restart, "leader")


async def test_killing_a_follower_under_load_loses_and_repeats_nothing(
    healthy_cluster: NatsCluster, store: JetStreamEventStore, tmp_path: Path
) -> None:
    await _under_load(healthy_cluster, store, tmp_path, _kill_and_restart, "follower")


async def test_a_paused_stream_leader_under_load_loses_and_repeats_nothing(
    healthy_cluster: NatsCluster, store: JetStreamEventStore, tmp_path: Path
) -> None:
    await _under_load(healthy_cluster, store, tmp_path, _pause_and_resume, "leader")


async def test_a_feed_whose_consumer_sat_on_a_killed_node_resumes_without_a_reconnect(
    healthy_cluster: NatsCluster, prefix: str
) -> None:
    """The client talks to the stream leader; the feed's consumer sits on a follower, which is
    SIGKILLed. Nothing tells the client (its connection stays up, no status message comes): a
    late heartbeat and an unanswered probe do, then the consumer is recreated on a live node,
    every event once and in order; a create the meta leader places on the dead node (it has
    not noticed the death yet) is asked again beside, so it costs a quarter second, not one."""
    opener = await JetStreamEventStore.connect(
        healthy_cluster.url, prefix=prefix, replicas=3, election_timeout=ELECTION_TIMEOUT
    )
    await opener.append("load.warm", NewEvent(type="warm", data={}))
    await opener.close()
    leader = await healthy_cluster.stream_leader(f"{prefix.upper()}_EVENTS")
    store = await JetStreamEventStore.connect(
        leader.url, prefix=prefix, replicas=3, election_timeout=ELECTION_TIMEOUT
    )
    seen: list[int] = []
    silence = [0.0, time.monotonic()]
    acked: list[int] = []
    stop = asyncio.Event()

    async def appender() -> None:
        while not stop.is_set():
            result = await store.append("load.steady", NewEvent(type="note", data={}))
            acked.append(result.last_position)
            await asyncio.sleep(0.01)

    async def watch(feed: Subscription) -> None:
        async for event in feed:
            seen.append(event.position)
            now = time.monotonic()
            silence[0] = max(silence[0], now - silence[1])
            silence[1] = now

    appending = asyncio.create_task(appender())
    try:
        for _ in range(20):  # placement is random among the stream's peers: until a follower
            seen.clear()
            live = store.subscribe(EventFilter(types=("note",)), name="probe-feed")
            watching = asyncio.create_task(watch(live))
            await wait_for(lambda: _seen_count(seen, 20), timeout=10)
            where = (await store.subscribers()).get("probe-feed")
            if where is not None and where != leader.server_name:
                break
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await live.close()
        else:
            pytest.fail("the feed's consumer never sat on a follower in 20 tries")
        try:
            victim = healthy_cluster.node_named(where)
            meta = (await healthy_cluster.meta_leader()).server_name
            silence[0], silence[1] = 0.0, time.monotonic()
            await victim.kill()
            target = len(seen) + 100  # events the feed delivers after the kill
            await wait_for(lambda: _seen_count(seen, target), timeout=ELECTION_TIMEOUT)
            stop.set()
            await appending
            await wait_for(lambda: _caught_up(seen, acked[-1]), timeout=ELECTION_TIMEOUT)
            moved = (await store.subscribers()).get("probe-feed")
            print(
                f"\nfeed on the killed node {where}: longest silence {silence[0]:.2f}s "
                f"(appends went on; the meta leader was {meta}); its consumer sits on {moved} now"
            )
            assert moved in {n.server_name for n in healthy_cluster if n.running}, moved
            assert seen == sorted(set(seen)), "a duplicate or another order"
            assert [p for p in seen if p >= seen[0]] == [p for p in acked if p >= seen[0]]
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await live.close()
    finally:
        stop.set()
        appending.cancel()
        await asyncio.gather(appending, return_exceptions=True)
        await store.close()
        await healthy_cluster.heal()
        await _delete_stream(healthy_cluster, prefix)


async def _seen_any(seen: list[int]) -> bool:
    return bool(seen)


async def _seen_count(seen: list[int], count: int) -> bool:
    return len(seen) >= count


async def _caught_up(seen: list[int], head: int) -> bool:
    return bool(seen) and seen[-1] >= head
