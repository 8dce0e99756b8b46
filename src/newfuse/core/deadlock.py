"""Deadlock detection between sagas: the wait-for graph of the `lock.*` streams, its cycles,
and one victim per cycle.

A detector follows every lock event (a subscription on the `lock` category, from the start) and
folds each resource's lock (core/locks.py). The wait-for graph has an edge waiter saga ->
holder saga for each waiter of each held lock. It looks for cycles whenever a new wait begins
(or a grant gives a waiter a new holder) and every `interval` seconds: a cycle it could not
break at once (an abort lost to a store outage, a victim not yet waiting in its own stream) is
found again without a new event.

The victim of a cycle is its youngest saga: the latest `saga.started` timestamp, ties broken by
the larger saga id. Every detector instance computes the same from the same log, so two
detectors pick the same victim and never two sagas of one cycle. Aborting is appending
`saga.aborted` to the victim's stream expecting the version at which it waits: of two detectors
one append is stored, the other conflicts (or reads it aborted already) and does nothing; a saga
that got its lock meanwhile moved its stream on, so it is not aborted either. The orchestrator
driving the victim fails the waiting step for good, compensates the completed steps, and
releases every lock of the saga when it has rolled back.

Sweep: a lock held (or asked for) by a saga that has ended, longer than `stale_after` seconds,
is released by the detector (an orchestrator that died between the saga's end and its
releases leaves such a lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from newfuse.core import locks
from newfuse.core.locks import LockState
from newfuse.core.orchestrator import read_saga, saga_stream
from newfuse.core.saga import SagaState
from newfuse.errors import FuseError, WrongExpectedVersionError
from newfuse.eventstore import EventFilter, EventStore
from newfuse.schemas import LockGranted, LockRequested, NewEvent, SagaAborted

log = logging.getLogger("newfuse.deadlock")


@dataclass(frozen=True)
class Detection:
    """One cycle this detector broke: its sagas, the victim, and how long after the wait that
    closed the cycle the abort was stored (seconds)."""

    cycle: tuple[str, ...]
    victim: str
    seconds: float


def wait_for_graph(states: dict[str, LockState]) -> dict[str, set[str]]:
    """Waiter saga -> the sagas holding what it waits for."""
    graph: dict[str, set[str]] = {}
    for lock in states.values():
        if lock.holder is None:
            continue
        for waiter in lock.waiters:
            if waiter != lock.holder.saga_id:
                graph.setdefault(waiter, set()).add(lock.holder.saga_id)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The cycles a depth-first search of `graph` closes, each rotated to start at its least
    saga id (so the same cycle reads the same everywhere), without repeats."""
    found: dict[tuple[str, ...], None] = {}
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = []
        on_path: dict[str, int] = {}
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph.get(start, ())))]
        path.append(start)
        on_path[start] = 0
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                on_path.pop(node, None)
                done.add(node)
                continue
            nxt = todo.pop()
            if nxt in on_path:
                cycle = path[on_path[nxt] :]
                least = cycle.index(min(cycle))
                found[tuple(cycle[least:] + cycle[:least])] = None
            elif nxt not in done:
                on_path[nxt] = len(path)
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return list(found)


def choose_victim(states: list[SagaState]) -> SagaState:
    """The youngest saga: the latest start, ties by the larger id (the same for everyone)."""
    floor = datetime.min.replace(tzinfo=UTC)
    return max(states, key=lambda s: (s.started_at or floor, s.id))


class DeadlockDetector:
    """Finds wait-for cycles between sagas on `store` and aborts one victim per cycle.

    Use `async with DeadlockDetector(store) as detector:`; `detections` lists what it broke.
    Several instances may run at once (they pick the same victim; one abort is stored).

    Args:
        store: the event store holding the `lock.*` and `saga.*` streams.
        name: this instance's name in its aborts (default: host, pid and a random part).
        interval: seconds between periodic checks.
        stale_after: seconds a lock of an ended saga stays before the sweep releases it.
        on_change: check on each new wait or grant (False: only every `interval` seconds).
    """

    def __init__(
        self,
        store: EventStore,
        *,
        name: str | None = None,
        interval: float = 0.5,
        stale_after: float = 5.0,
        on_change: bool = True,
    ) -> None:
        self.store = store
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.interval = interval
        self.stale_after = stale_after
        self.on_change = on_change
        self.locks: dict[str, LockState] = {}
        self.detections: list[Detection] = []
        self.lost = 0
        """Aborts not stored: another detector's came first, or the victim moved on."""
        self.swept = 0
        """Locks of ended sagas this instance released."""
        self._new_wait = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_sweep = time.monotonic()

    async def __aenter__(self) -> DeadlockDetector:
        self._tasks = [
            asyncio.create_task(self._follow(), name=f"newfuse-deadlock-follow-{self.name}"),
            asyncio.create_task(self._check_loop(), name=f"newfuse-deadlock-{self.name}"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop following and checking. Idempotent."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _follow(self) -> None:
        while True:
            try:
                self.locks.clear()
                async with self.store.subscribe(EventFilter(categories=(locks.CATEGORY,))) as feed:
                    async for event in feed:
                        resource = event.stream.partition(".")[2]
                        state = self.locks.get(resource)
                        if state is None:
                            state = self.locks[resource] = LockState(resource)
                        state.apply(event)
                        # a wait, or a grant (a waiter's holder changed), may close a cycle
                        if self.on_change and isinstance(event.data, LockRequested | LockGranted):
                            self._new_wait.set()
            except asyncio.CancelledError:
                raise
            except FuseError as error:
                log.warning("detector %s: following locks: %s; again in 1s", self.name, error)
                await asyncio.sleep(1.0)

    async def _check_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._new_wait.wait()
            self._new_wait.clear()
            try:
                await self.check()
                if time.monotonic() - self._last_sweep >= self.stale_after:
                    self._last_sweep = time.monotonic()
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # a store outage or a bug: log it, the next check tries again
                log.exception("detector %s: check", self.name)

    async def check(self) -> list[Detection]:
        """One look at the wait-for graph: abort the victim of each cycle; what it broke."""
        broke: list[Detection] = []
        for cycle in find_cycles(wait_for_graph(self.locks)):
            detection = await self._break(cycle)
            if detection is not None:
                broke.append(detection)
        self.detections.extend(broke)
        return broke

    async def _break(self, cycle: tuple[str, ...]) -> Detection | None:
        states = [await read_saga(self.store, saga_id) for saga_id in cycle]
        if any(not s.name or s.ended for s in states):
            return None  # an ended saga's locks are on their way out (or swept)
        if any(s.aborted is not None for s in states):
            return None  # this cycle has its victim (ours or another detector's)
        victim = choose_victim(states)
        wait = victim.lock_wait
        successor = cycle[(cycle.index(victim.id) + 1) % len(cycle)]
        lock = self.locks.get(wait.resource) if wait is not None else None
        if (
            wait is None
            or lock is None
            or victim.id not in lock.waiters
            or lock.holder is None
            or lock.holder.saga_id != successor
        ):
            return None  # our view lags the victim's: it got its lock, or waits elsewhere now
        members = " -> ".join((*cycle, cycle[0]))
        abort = SagaAborted(
            saga_id=victim.id,
            step=wait.step,
            reason=f"deadlock victim: the youngest saga in the wait-for cycle {members}",
            cycle=list(cycle),
            detector=self.name,
        )
        try:
            await self.store.append(
                saga_stream(victim.id),
                NewEvent(data=abort, correlation_id=victim.id),
                victim.version,
            )
        except WrongExpectedVersionError:
            self.lost += 1
            return None
        closed = max(
            waiter.since
            for lock in self.locks.values()
            for saga_id, waiter in lock.waiters.items()
            if saga_id in cycle
        )
        seconds = (datetime.now(UTC) - closed).total_seconds()
        log.warning(
            "detector %s: aborted %s (%s) after %.3fs", self.name, victim.id, members, seconds
        )
        return Detection(cycle, victim.id, seconds)

    async def sweep(self) -> int:
        """Release the locks (held or asked for) of sagas that ended more than `stale_after`
        seconds ago; how many it released."""
        now = datetime.now(UTC)
        released = 0
        for lock in list(self.locks.values()):
            owners = [
                w.saga_id for w in lock.waiters.values() if _older(w.since, now, self.stale_after)
            ]
            if lock.holder is not None and _older(lock.holder.since, now, self.stale_after):
                owners.append(lock.holder.saga_id)
            for saga_id in owners:
                state = await read_saga(self.store, saga_id)
                if not state.ended or state.ended_at is None:
                    continue
                if not _older(state.ended_at, now, self.stale_after):
                    continue
                reason = f"swept by detector {self.name}: saga {state.status}"
                settled = state.settled
                if await locks.release(self.store, lock.resource, saga_id, reason, final=settled):
                    released += 1
        self.swept += released
        return released


def _older(when: datetime, now: datetime, seconds: float) -> bool:
    return (now - when).total_seconds() >= seconds
