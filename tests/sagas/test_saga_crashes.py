"""Crash recovery with real processes: 200 sagas, two orchestrator processes, one SIGKILLed at
random points and restarted, one paused past its leases (SIGSTOP / SIGCONT). Every saga ends
committed or rolled back, no effect happens twice, and every compensation matches a completed
step; a paused instance's late writes are fenced off. Then sagas that lock shared resources,
with both processes SIGKILLed at random: every lock is released at the end, grants never
overlap, and the fencing tokens of the effects on each resource only grow."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as redis
from saga_worker import PAIRS, RESOURCES, booking, transfer

from newfuse.core.locks import lock_stream, read_lock
from newfuse.core.orchestrator import read_saga, saga_stream, start_saga
from newfuse.eventstore.jetstream import JetStreamEventStore

pytestmark = [pytest.mark.faults, pytest.mark.slow]

WORKER = Path(__file__).with_name("saga_worker.py")
SAGAS = 200
STEPS = ("reserve", "charge", "notify", "confirm")
"""charge and notify are a parallel group: two steps of one saga in flight at once."""


def _spawn(
    nats_url: str, prefix: str, redis_url: str, name: str, logs: Path
) -> subprocess.Popen[str]:
    with (logs / f"{name}.log").open("a") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(WORKER), nats_url, prefix, redis_url, name],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    assert line == "ready", (logs / f"{name}.log").read_text()
    return process


def _kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL (SIGCONT first, if paused), wait, close its pipe: it leaves nothing behind."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.kill()
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


def _seeded() -> random.Random:
    """A random source whose seed the test prints (to run the same again)."""
    seed = random.randrange(1 << 30)
    print(f"\nseed {seed}")
    return random.Random(seed)


async def _spawn_two(
    nats_url: str, prefix: str, redis_url: str, logs: Path
) -> dict[str, subprocess.Popen[str]]:
    return {
        name: await asyncio.to_thread(_spawn, nats_url, prefix, redis_url, name, logs)
        for name in ("a", "b")
    }


async def _all_end(store: JetStreamEventStore, saga_ids: list[str], *, within: float) -> None:
    """Wait until every saga of `saga_ids` has ended; fail naming some that did not."""
    deadline = time.monotonic() + within
    while True:
        left = [s for s in saga_ids if not (await read_saga(store, s)).ended]
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert left == [], f"{len(left)} sagas did not end, e.g. {left[:3]}"


async def test_killed_and_paused_orchestrators_lose_no_saga_and_repeat_no_effect(
    store: JetStreamEventStore, nats_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    rng = _seeded()
    db = redis.Redis.from_url(redis_url)
    definition = booking(db, prefix)
    failing = {f"s{n:03d}" for n in range(SAGAS) if n % 5 == 0}  # 40 roll back
    workers = await _spawn_two(nats_url, prefix, redis_url, tmp_path)
    kills = pauses = 0
    try:
        ids = iter(f"s{n:03d}" for n in range(SAGAS))

        async def start(count: int) -> None:
            # in waves, so every kill and the pause find sagas in flight (200 at once would
            # all have ended before the first kill)
            for saga_id in (next(ids) for _ in range(count)):
                await start_saga(store, definition, {"fail": saga_id in failing}, saga_id=saga_id)

        started = time.monotonic()
        for _ in range(8):  # SIGKILL `a` at random points while the sagas run, then restart it
            await start(20)
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            _kill(workers["a"])
            kills += 1
            workers["a"] = await asyncio.to_thread(
                _spawn, nats_url, prefix, redis_url, "a", tmp_path
            )
        await start(SAGAS - 160)
        await asyncio.sleep(rng.uniform(0.05, 0.2))
        workers["b"].send_signal(signal.SIGSTOP)  # past its leases (a step's 1 s + 2 s grace)
        pauses += 1
        await asyncio.sleep(4.0)
        workers["b"].send_signal(signal.SIGCONT)

        await _all_end(store, [f"s{n:03d}" for n in range(SAGAS)], within=60)
        took = time.monotonic() - started
        counters = {}
        for name, process in workers.items():
            process.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(process.communicate, timeout=20)
            counters[name] = json.loads(out.strip().splitlines()[-1])

        runs = applied = 0
        for n in range(SAGAS):
            saga_id = f"s{n:03d}"
            state = await read_saga(store, saga_id)
            expected = "rolled_back" if saga_id in failing else "committed"
            assert state.status == expected, (saga_id, state.status, state.error)
            done = {s for s in STEPS if state.steps[s].status in ("done", "compensated")}
            undone = {s for s in STEPS if state.steps[s].status == "compensated"}
            for step in STEPS:
                effect = await db.get(f"{prefix}:applied:{saga_id}/{step}")
                undo = await db.get(f"{prefix}:applied:{saga_id}/{step}/undo")
                runs += int(await db.get(f"{prefix}:runs:{saga_id}/{step}") or 0)
                # an effect happened exactly for the steps the log says completed, once (SET NX)
                assert (effect is not None) == (step in done), (saga_id, step, state.steps[step])
                assert (undo is not None) == (step in undone), (saga_id, step)
                applied += effect is not None
            if expected == "rolled_back":  # every completed step was compensated
                assert undone == {"reserve", "charge", "notify"}, (saga_id, undone)
                # the group's compensations ended before reserve's began (groups newest first)
                undos = [
                    (e.type, e.data.step)
                    async for e in store.read(saga_stream(saga_id))
                    if getattr(e.data, "phase", "") == "compensation"
                ]
                first_reserve = undos.index(("saga.step_started", "reserve"))
                last_group = max(
                    i
                    for i, (kind, step) in enumerate(undos)
                    if kind == "saga.step_completed" and step in ("charge", "notify")
                )
                assert last_group < first_reserve, (saga_id, undos)
        print(
            f"{SAGAS} sagas ended in {took:.1f}s through {kills} SIGKILLs and {pauses} pause: "
            f"{applied} effects, {runs} action runs ({runs - applied} re-runs after a crash, "
            f"absorbed by the idempotency key); fenced writes: {counters}"
        )
    finally:
        for process in workers.values():
            _kill(process)
        await db.aclose()


LOCKING_SAGAS = 36


async def test_killed_orchestrators_release_every_lock_and_fence_every_effect(
    store: JetStreamEventStore, nats_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    rng = _seeded()
    db = redis.Redis.from_url(redis_url)
    pairs = {f"t{n:02d}": PAIRS[n % len(PAIRS)] for n in range(LOCKING_SAGAS)}
    failing = {saga_id for n, saga_id in enumerate(pairs) if n % 4 == 3}  # 9 roll back
    workers = await _spawn_two(nats_url, prefix, redis_url, tmp_path)
    kills = 0
    try:
        for saga_id, (first, second) in pairs.items():
            definition = transfer(db, prefix, first, second)
            await start_saga(store, definition, {"fail": saga_id in failing}, saga_id=saga_id)
        started = time.monotonic()
        for _ in range(6):  # SIGKILL either process at random points, then restart it
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            name = rng.choice(("a", "b"))
            _kill(workers[name])
            kills += 1
            workers[name] = await asyncio.to_thread(
                _spawn, nats_url, prefix, redis_url, name, tmp_path
            )

        await _all_end(store, list(pairs), within=90)
        took = time.monotonic() - started

        # every lock is free once the releases that follow each end are in (no leak)
        locks = {}
        for _ in range(100):
            locks = {r: await read_lock(store, r) for r in RESOURCES}
            if all(lock.holder is None and not lock.waiters for lock in locks.values()):
                break
            await asyncio.sleep(0.1)
        for resource, lock in locks.items():
            assert lock.holder is None and not lock.waiters, (resource, lock.holder, lock.waiters)
            assert lock.ignored == [], (resource, lock.ignored)  # no grant over another's

        grants: dict[str, list[tuple[int, str]]] = {r: [] for r in RESOURCES}
        for resource in RESOURCES:  # grants alternate with their holder's release
            holder = None
            async for event in store.read(lock_stream(resource)):
                if event.type == "lock.granted":
                    assert holder is None, (resource, event.version, holder)
                    holder = event.data.saga_id
                    grants[resource].append((event.version, holder))
                elif event.type == "lock.released" and event.data.saga_id == holder:
                    holder = None

        runs = applied = 0
        for saga_id, (first, second) in pairs.items():
            state = await read_saga(store, saga_id)
            expected = "rolled_back" if saga_id in failing else "committed"
            assert state.status == expected, (saga_id, state.status, state.error)
            # each lock granted once to the saga, and the saga's steps carried that token
            for resource in (first, second):
                tokens = [v for v, holder in grants[resource] if holder == saga_id]
                assert tokens == [state.locks[resource]], (saga_id, resource, tokens)
            for step in ("debit", "credit"):
                key = f"{saga_id}/{step}"
                runs += int(await db.get(f"{prefix}:runs:{key}") or 0)
                assert await db.get(f"{prefix}:applied:{key}") is not None, key
                undone = await db.get(f"{prefix}:applied:{key}/undo") is not None
                assert undone == (expected == "rolled_back"), key
                applied += 1 + undone

        for resource in RESOURCES:
            assert int(await db.get(f"{prefix}:refused:{resource}") or 0) == 0, resource
            log = [
                entry.decode().split()
                for entry in await db.lrange(f"{prefix}:log:{resource}", 0, -1)
            ]
            keys = [key for _, _, key in log]
            assert len(keys) == len(set(keys)), resource  # no effect twice
            tokens = [int(token) for token, _, _ in log]
            # in the order the resource took them: one token per saga, and they only grow
            assert tokens == sorted(tokens), (resource, tokens)
            owners = {int(token): saga for token, saga, _ in log}
            assert len(owners) == len({saga for _, saga, _ in log}), (resource, owners)
            assert {t: s for t, s in grants[resource]} == owners, resource
        print(
            f"{LOCKING_SAGAS} locking sagas ended in {took:.1f}s through {kills} SIGKILLs: "
            f"{applied} fenced effects ({2 * LOCKING_SAGAS} actions, the rest compensations) "
            f"from {runs} action runs, "
            f"{sum(len(g) for g in grants.values())} grants, every lock free"
        )
    finally:
        for process in workers.values():
            _kill(process)
        await db.aclose()
