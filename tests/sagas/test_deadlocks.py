"""Named locks between sagas and deadlock detection, on real orchestrators and a real
JetStream store: real wait-for cycles (each saga locks in its declared order), one victim per
cycle however many detectors run, every other saga commits, no lock left held."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from newfuse.core import locks
from newfuse.core.deadlock import DeadlockDetector, find_cycles
from newfuse.core.locks import LockState, read_lock
from newfuse.core.orchestrator import Orchestrator, read_saga, saga_stream
from newfuse.core.saga import Saga, SagaState, StepContext
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.schemas import (
    LockGranted,
    LockReleased,
    LockRequested,
    NewEvent,
    SagaCommitted,
    SagaStarted,
)
from support import run_fuse


def _locking(
    name: str,
    first: str,
    second: str,
    log: list[str],
    barrier: asyncio.Barrier | None,
    *,
    lock_timeout: float = 30.0,
) -> Saga:
    """Step `hold` locks `first` and (when `barrier` is given) waits for every saga of the test
    to hold its first lock; step `take` then locks `second`: a real cycle when the sagas' pairs
    go round."""
    saga = Saga(name)

    @saga.step("hold", locks=(first,), lock_timeout=lock_timeout)
    async def hold(ctx: StepContext) -> str:
        log.append(f"{ctx.saga_id} hold {ctx.locks[first]}")
        if barrier is not None:
            async with asyncio.timeout(20):
                await barrier.wait()
        return first

    @saga.compensate("hold")
    async def undo_hold(ctx: StepContext) -> None:
        log.append(f"{ctx.saga_id} undo hold")

    @saga.step("take", locks=(second,), lock_timeout=lock_timeout)
    async def take(ctx: StepContext) -> str:
        log.append(f"{ctx.saga_id} take")
        return second

    return saga


async def _locks_free(store: JetStreamEventStore, resources: list[str]) -> list[LockState]:
    """The locks once none is held or waited for (the releases follow each saga's end), or as
    they are after 15 s."""
    states: list[LockState] = []
    for _ in range(150):
        states = [await read_lock(store, r) for r in resources]
        if all(s.holder is None and not s.waiters for s in states):
            break
        await asyncio.sleep(0.1)
    return states


async def _aborts(store: JetStreamEventStore, saga_ids: list[str]) -> list[tuple[str, str]]:
    """(saga, detector) of every saga.aborted stored for `saga_ids`."""
    found: list[tuple[str, str]] = []
    for saga_id in saga_ids:
        async for event in store.read(saga_stream(saga_id)):
            if event.type == "saga.aborted":
                found.append((saga_id, event.data.detector))
    return found


async def _cycle(
    store: JetStreamEventStore, size: int, detectors: int, *, on_change: bool = True
) -> tuple[list[SagaState], list[str], list[DeadlockDetector], list[str]]:
    """`size` sagas s0..s<size-1>, saga i locking r<i> then r<i+1 mod size>, started oldest
    first, with `detectors` detectors running; their end states, the log, the detectors."""
    log: list[str] = []
    barrier = asyncio.Barrier(size)
    resources = [f"r{i}" for i in range(size)]
    sagas = [
        _locking(f"pair{i}", resources[i], resources[(i + 1) % size], log, barrier)
        for i in range(size)
    ]
    found: list[DeadlockDetector] = []
    async with Orchestrator(store, sagas) as orchestrator:
        running = [
            DeadlockDetector(store, name=f"detector-{n}", interval=0.2, on_change=on_change)
            for n in range(detectors)
        ]
        for detector in running:
            await detector.__aenter__()
        try:
            ids = []
            for i in range(size):
                ids.append(await orchestrator.start(f"pair{i}", saga_id=f"s{i}"))
                await asyncio.sleep(0.01)  # distinct start times: s<size-1> is the youngest
            ends = [await orchestrator.wait(saga_id, timeout=40) for saga_id in ids]
            states = await _locks_free(store, resources)
        finally:
            for detector in running:
                await detector.close()
            found = running
    assert all(s.holder is None and not s.waiters for s in states), [
        (s.resource, s.holder, s.waiters) for s in states
    ]
    return ends, log, found, ids


def _check_one_victim(
    ends: list[SagaState], log: list[str], ids: list[str], aborts: list[tuple[str, str]]
) -> None:
    youngest = ids[-1]
    assert [a[0] for a in aborts] == [youngest]  # exactly one abort, of the youngest
    for state in ends:
        if state.id == youngest:
            assert state.status == "rolled_back"
            assert state.failed_step == "take"
            assert state.error is not None and "deadlock victim" in state.error
            assert f"{state.id} undo hold" in log and f"{state.id} take" not in log
        else:
            assert state.status == "committed", (state.id, state.status, state.error)
            assert f"{state.id} take" in log and f"{state.id} undo hold" not in log


def _print_times(what: str, detectors: list[DeadlockDetector]) -> None:
    times = [d.seconds for detector in detectors for d in detector.detections]
    print(f"\n{what}: detection {', '.join(f'{t * 1000:.0f} ms' for t in times)}")


async def test_a_two_saga_cycle_aborts_the_youngest_and_the_other_commits(
    store: JetStreamEventStore,
) -> None:
    ends, log, detectors, ids = await _cycle(store, 2, 1)
    _check_one_victim(ends, log, ids, await _aborts(store, ids))
    assert [d.cycle for d in detectors[0].detections] == [("s0", "s1")]
    _print_times("2-saga cycle", detectors)


async def test_a_three_saga_cycle_aborts_exactly_one_and_the_other_two_commit(
    store: JetStreamEventStore,
) -> None:
    ends, log, detectors, ids = await _cycle(store, 3, 1)
    _check_one_victim(ends, log, ids, await _aborts(store, ids))
    assert [d.cycle for d in detectors[0].detections] == [("s0", "s1", "s2")]
    _print_times("3-saga cycle", detectors)


async def test_two_detectors_at_once_abort_one_victim_per_cycle(
    store: JetStreamEventStore,
) -> None:
    ends, log, detectors, ids = await _cycle(store, 3, 2)
    aborts = await _aborts(store, ids)
    _check_one_victim(ends, log, ids, aborts)
    assert sum(len(d.detections) for d in detectors) == 1
    assert aborts[0][1] in ("detector-0", "detector-1")
    _print_times("3-saga cycle, 2 detectors", detectors)


async def test_the_periodic_check_alone_finds_the_cycle(store: JetStreamEventStore) -> None:
    ends, log, detectors, ids = await _cycle(store, 2, 1, on_change=False)
    _check_one_victim(ends, log, ids, await _aborts(store, ids))
    _print_times("2-saga cycle, periodic check only (0.2 s)", detectors)


async def test_without_a_detector_the_lock_wait_timeout_rolls_the_waiter_back(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    barrier = asyncio.Barrier(2)
    sagas = [
        _locking("ab", "a", "b", log, barrier, lock_timeout=1.0),
        _locking("ba", "b", "a", log, barrier, lock_timeout=3.0),
    ]
    async with Orchestrator(store, sagas) as orchestrator:
        first = await orchestrator.start("ab", saga_id="t0")
        second = await orchestrator.start("ba", saga_id="t1")
        ends = {s.id: s for s in [await orchestrator.wait(i, timeout=30) for i in (first, second)]}
        states = await _locks_free(store, ["a", "b"])
    # t0 waits 1 s for b and gives up; its rollback frees a, which t1 gets within its 3 s
    assert ends["t0"].status == "rolled_back"
    assert ends["t0"].error == "lock wait for 'b' timed out after 1s"
    assert ends["t1"].status == "committed"
    assert await _aborts(store, ["t0", "t1"]) == []
    assert all(s.holder is None and not s.waiters for s in states)
    assert "t0 undo hold" in log


async def test_grants_are_exclusive_and_their_tokens_grow(store: JetStreamEventStore) -> None:
    log: list[str] = []
    sagas = [_locking(f"one{i}", "shared", f"own{i}", log, None) for i in range(4)]
    async with Orchestrator(store, sagas) as orchestrator:
        ids = [await orchestrator.start(f"one{i}", saga_id=f"u{i}") for i in range(4)]
        ends = [await orchestrator.wait(i, timeout=30) for i in ids]
    assert [s.status for s in ends] == ["committed"] * 4
    tokens: list[int] = []
    holder: str | None = None
    async for event in store.read("lock.shared"):
        if event.type == "lock.granted":
            assert holder is None  # never two grants without a release between
            holder = event.data.saga_id
            assert event.data.token == event.version
            tokens.append(event.data.token)
        elif event.type == "lock.released" and event.data.saga_id == holder:
            holder = None
    assert len(tokens) == 4 and tokens == sorted(tokens)
    assert {s.locks["shared"] for s in ends} == set(tokens)
    # each action saw its grant's token (to carry in its writes elsewhere)
    assert {int(line.split()[-1]) for line in log if " hold " in line} == set(tokens)


def test_cycles_are_found_once_each_from_their_least_id() -> None:
    graph = {"c": {"a"}, "a": {"b"}, "b": {"c"}, "x": {"y"}, "y": {"x", "c"}, "z": {"a"}}
    assert sorted(find_cycles(graph)) == [("a", "b", "c"), ("x", "y")]
    assert find_cycles({"a": {"b"}, "b": {"c"}}) == []


async def test_fuse_locks_shows_holders_and_waiters(
    store: JetStreamEventStore, nats_url: str, prefix: str
) -> None:
    log: list[str] = []
    go = asyncio.Event()
    holding = Saga("holding")

    @holding.step("hold", locks=("account-1",))
    async def hold(ctx: StepContext) -> None:
        await go.wait()

    sagas = [holding, _locking("waiting", "account-1", "other", log, None)]

    def fuse(*args: str) -> Any:
        return run_fuse("--nats", nats_url, "--prefix", prefix, "locks", *args)

    async with Orchestrator(store, sagas) as orchestrator:
        await orchestrator.start("holding", saga_id="h1")
        for _ in range(100):
            if (await read_lock(store, "account-1")).holder is not None:
                break
            await asyncio.sleep(0.05)
        await orchestrator.start("waiting", saga_id="w1")
        for _ in range(100):
            if "w1" in (await read_lock(store, "account-1")).waiters:
                break
            await asyncio.sleep(0.05)
        listed = [
            json.loads(line)
            for line in (await asyncio.to_thread(fuse, "--json")).stdout.splitlines()
        ]
        table = (await asyncio.to_thread(fuse)).stdout
        go.set()
        await orchestrator.wait("h1", timeout=20)
        assert (await orchestrator.wait("w1", timeout=20)).status == "committed"
    assert len(listed) == 1
    (lock,) = listed
    assert lock["resource"] == "account-1"
    assert lock["holder"]["saga"] == "h1" and lock["holder"]["step"] == "hold"
    assert lock["holder"]["token"] >= 1 and lock["holder"]["since"]
    assert [(w["saga"], w["step"]) for w in lock["waiters"]] == [("w1", "hold")]
    assert "account-1" in table and "h1" in table and "w1 (hold)" in table
    state = await read_saga(store, "w1")
    assert any("waits for lock account-1" in line for line in state.steps["hold"].history)


async def test_a_lock_stream_s_contradictions_are_ignored_and_named(
    store: JetStreamEventStore,
) -> None:
    stream = "lock.vault"
    events = [
        LockRequested(resource="vault", saga_id="h1", step="s"),
        LockGranted(resource="vault", saga_id="h1", step="s", token=2),
        LockGranted(resource="vault", saga_id="x9", step="s", token=3),  # a second grant
        LockReleased(resource="vault", saga_id="x9", token=3),  # released by a stranger
        LockRequested(resource="other", saga_id="w1", step="s"),  # another resource's
        SagaCommitted(saga_id="h1"),  # not a lock event
    ]
    for event in events:
        await store.append(stream, NewEvent(data=event))
    lock = await read_lock(store, "vault")
    assert lock.holder is not None and (lock.holder.saga_id, lock.holder.token) == ("h1", 2)
    assert lock.waiters == {}
    assert [line.split(": ", 1)[1] for line in lock.ignored] == [
        "'h1' holds it",
        "'x9' neither holds nor waits",
        "it names resource 'other'",
        "not a lock event",
    ]
    async with DeadlockDetector(store, interval=0.05) as detector:
        assert await detector.check() == []  # a stream like this is no cycle, and no crash


async def test_the_sweep_releases_locks_an_ended_saga_left(store: JetStreamEventStore) -> None:
    # an orchestrator died between the saga's commit and its releases: the lock stays held
    long_ago = datetime.now(UTC) - timedelta(seconds=60)
    await store.append(
        saga_stream("gone"),
        [
            NewEvent(data=SagaStarted(saga_id="gone", name="x", steps=["s"], timestamp=long_ago)),
            NewEvent(data=SagaCommitted(saga_id="gone", timestamp=long_ago)),
        ],
    )
    await store.append(
        saga_stream("alive"),
        NewEvent(data=SagaStarted(saga_id="alive", name="x", steps=["s"], timestamp=long_ago)),
    )
    for saga_id, resource in (("gone", "left"), ("alive", "kept")):
        await store.append(
            f"lock.{resource}",
            [
                NewEvent(
                    data=LockRequested(
                        resource=resource, saga_id=saga_id, step="s", timestamp=long_ago
                    )
                ),
                NewEvent(
                    data=LockGranted(
                        resource=resource, saga_id=saga_id, step="s", token=2, timestamp=long_ago
                    )
                ),
            ],
        )
    async with DeadlockDetector(store, interval=0.05, stale_after=5.0) as detector:
        for _ in range(100):
            if {"left", "kept"} <= set(detector.locks):
                break
            await asyncio.sleep(0.05)
        assert await detector.sweep() == 1
    assert (await read_lock(store, "left")).holder is None
    kept = await read_lock(store, "kept")
    assert kept.holder is not None and kept.holder.saga_id == "alive"


async def test_locks_belong_to_sagas_so_another_orchestrator_carries_on_a_wait(
    store: JetStreamEventStore,
) -> None:
    log: list[str] = []
    go = asyncio.Event()
    holding = Saga("holding")

    @holding.step("hold", locks=("desk",))
    async def hold(ctx: StepContext) -> int:
        log.append(f"hold {ctx.attempt} {ctx.locks['desk']}")
        await go.wait()
        return ctx.locks["desk"]

    sagas = [holding, _locking("waiting", "desk", "chair", log, None)]
    async with Orchestrator(store, sagas, name="first") as first:
        await first.start("holding", saga_id="h1")
        for _ in range(200):
            if log:  # h1 holds the desk
                break
            await asyncio.sleep(0.05)
        await first.start("waiting", saga_id="w1")
        for _ in range(200):
            desk = await read_lock(store, "desk")
            if desk.holder is not None and "w1" in desk.waiters and log:
                break
            await asyncio.sleep(0.05)
    # the first orchestrator stopped: h1's claim was given back, w1 still waits in its stream
    assert (await read_saga(store, "w1")).lock_wait is not None
    go.set()
    async with Orchestrator(store, sagas, name="second") as second:
        held = await second.wait("h1", timeout=20)
        waited = await second.wait("w1", timeout=20)
    assert held.status == "committed" and waited.status == "committed"
    # h1 kept its grant across orchestrators (the same token on both attempts)
    assert len({line.split()[-1] for line in log if line.startswith("hold ")}) == 1
    assert held.outputs["hold"] == held.locks["desk"]
    states = await _locks_free(store, ["desk", "chair"])
    assert all(s.holder is None and not s.waiters for s in states), states


async def test_a_saga_that_committed_or_rolled_back_is_never_granted_a_lock_again(
    store: JetStreamEventStore,
) -> None:
    # an orchestrator whose view of saga `late` is behind asks for its lock after its end
    await locks.request(store, "after", "late", "s")
    token = await locks.try_grant(store, "after", "late", "s")
    assert token is not None
    assert await locks.release(store, "after", "late", "saga committed", final=True)
    ended_at = (await read_lock(store, "after")).version
    assert (await locks.request(store, "after", "late", "s")).finished == {"late"}
    assert await locks.try_grant(store, "after", "late", "s") is None
    state = await read_lock(store, "after")
    assert (state.version, state.holder, state.waiters, state.ignored) == (ended_at, None, {}, [])
    # a stuck saga's release is not final: a retry may ask again, and another saga still can
    await locks.request(store, "after", "stuck", "s")
    assert await locks.try_grant(store, "after", "stuck", "s") is not None
    assert await locks.release(store, "after", "stuck", "saga stuck")
    await locks.request(store, "after", "stuck", "s")
    assert await locks.try_grant(store, "after", "stuck", "s") is not None
