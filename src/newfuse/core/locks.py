"""Named exclusive locks as event streams: `lock.<resource>` in the event store.

A lock's state is the fold of its stream (`LockState`): the holder (saga, step, token, since)
and the waiters. Every write is appended with the version it read, so two grants never
coexist: a `lock.granted` is stored only on the version at which the lock was free, and of two
sagas that saw it free one grant is stored, the other gets WrongExpectedVersionError and reads
again. The fencing token of a grant is its stream version: monotonic per resource, so a write
elsewhere carrying a lower token than one already seen comes from a stale holder.

Locks belong to sagas, not to processes: a saga holds its locks until it ends, whichever
orchestrator drives it, and any of them may acquire or release on its behalf (each operation is
idempotent). A free lock goes to whichever waiter writes the grant first (no queue order: a
waiter whose process died does not block the others). The release at a saga's commit or
rollback is `final`: from then on neither a request nor a grant is written in its name, so an
orchestrator whose view of the saga is behind (it has not seen the end yet) cannot take the
lock again for a saga that is over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from newfuse.errors import WrongExpectedVersionError
from newfuse.eventstore import EventStore
from newfuse.schemas import (
    LockGranted,
    LockReleased,
    LockRequested,
    NewEvent,
    RecordedEvent,
    check_token,
)

CATEGORY = "lock"
CONFLICT_RETRIES = 50
"""Appends one operation retries after losing a race for the stream (each a fresh read)."""


def lock_stream(resource: str) -> str:
    """The stream of one resource's lock: `lock.<resource>`."""
    return f"{CATEGORY}.{check_token(resource, kind='lock resource')}"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: a saga's step, with the grant's fencing token."""

    saga_id: str
    step: str
    token: int
    since: datetime


@dataclass(frozen=True)
class Waiter:
    """A saga's step waiting for a lock."""

    saga_id: str
    step: str
    since: datetime


@dataclass
class LockState:
    """One resource's lock as the fold of its stream."""

    resource: str
    holder: Holder | None = None
    waiters: dict[str, Waiter] = field(default_factory=dict)
    """Waiting sagas by id, in the order they asked."""
    version: int = 0
    ignored: list[str] = field(default_factory=list)
    """Events read and not applied (foreign, malformed, contradictory), with why."""
    finished: set[str] = field(default_factory=set)
    """Sagas whose release was final (they committed or rolled back)."""

    @classmethod
    def fold(cls, resource: str, events: Iterable[RecordedEvent]) -> LockState:
        state = cls(resource)
        for event in events:
            state.apply(event)
        return state

    def apply(self, event: RecordedEvent) -> None:
        """Fold one event; one that does not fit is noted in `ignored`, never raised."""
        self.version = event.version
        data: Any = event.data
        where = f"position {event.position} ({event.type})"
        if not isinstance(data, LockRequested | LockGranted | LockReleased):
            self.ignored.append(f"{where}: not a lock event")
            return
        if data.resource != self.resource:
            self.ignored.append(f"{where}: it names resource {data.resource!r}")
            return
        if isinstance(data, LockRequested):
            if self.holder is None or self.holder.saga_id != data.saga_id:
                self.waiters.setdefault(
                    data.saga_id, Waiter(data.saga_id, data.step, data.timestamp)
                )
        elif isinstance(data, LockGranted):
            if self.holder is not None and self.holder.saga_id != data.saga_id:
                self.ignored.append(f"{where}: {self.holder.saga_id!r} holds it")
                return
            self.waiters.pop(data.saga_id, None)
            self.holder = Holder(data.saga_id, data.step, event.version, data.timestamp)
        else:
            if data.final:
                self.finished.add(data.saga_id)
            if self.holder is not None and self.holder.saga_id == data.saga_id:
                self.holder = None
                self.waiters.pop(data.saga_id, None)
            elif self.waiters.pop(data.saga_id, None) is None:
                self.ignored.append(f"{where}: {data.saga_id!r} neither holds nor waits")

    def held_by(self, saga_id: str) -> bool:
        return self.holder is not None and self.holder.saga_id == saga_id


async def read_lock(store: EventStore, resource: str) -> LockState:
    """The fold of `lock.<resource>` (free, nobody waiting, when it has no events)."""
    return LockState.fold(resource, [e async for e in store.read(lock_stream(resource))])


async def list_locks(store: EventStore) -> AsyncIterator[LockState]:
    """Every resource that has a lock stream, folded (free ones included)."""
    async for stream in store.streams(CATEGORY):
        yield await read_lock(store, stream.partition(".")[2])


async def _write(store: EventStore, state: LockState, event: Any) -> bool:
    try:
        await store.append(
            lock_stream(state.resource),
            NewEvent(data=event, correlation_id=event.saga_id),
            state.version,
        )
    except WrongExpectedVersionError:
        return False
    return True


async def request(store: EventStore, resource: str, saga_id: str, step: str) -> LockState:
    """Make `saga_id` a waiter for `resource` unless it holds or waits already, or its release
    was final; the lock's state after."""
    for _ in range(CONFLICT_RETRIES):
        state = await read_lock(store, resource)
        if state.held_by(saga_id) or saga_id in state.waiters or saga_id in state.finished:
            return state
        if await _write(store, state, LockRequested(resource=resource, saga_id=saga_id, step=step)):
            return await read_lock(store, resource)
    return await read_lock(store, resource)


async def try_grant(store: EventStore, resource: str, saga_id: str, step: str) -> int | None:
    """The fencing token of `saga_id`'s grant of `resource`: granted now when the lock is free
    and the saga waits for it; None while another saga holds it (or the saga does not wait, or
    its release was final)."""
    for _ in range(CONFLICT_RETRIES):
        state = await read_lock(store, resource)
        if state.holder is not None:
            return state.holder.token if state.holder.saga_id == saga_id else None
        if saga_id not in state.waiters or saga_id in state.finished:
            return None
        token = state.version + 1
        granted = LockGranted(resource=resource, saga_id=saga_id, step=step, token=token)
        if await _write(store, state, granted):
            return token
    return None


async def release(
    store: EventStore, resource: str, saga_id: str, reason: str, *, final: bool = False
) -> bool:
    """Let go of `resource` for `saga_id`: its grant, or its request; False when it had
    neither (releasing twice is harmless). `final`: the saga committed or rolled back (see the
    module's text)."""
    for _ in range(CONFLICT_RETRIES):
        state = await read_lock(store, resource)
        if state.held_by(saga_id):
            assert state.holder is not None
            token = state.holder.token
        elif saga_id in state.waiters:
            token = 0
        else:
            return False
        released = LockReleased(
            resource=resource, saga_id=saga_id, token=token, reason=reason, final=final
        )
        if await _write(store, state, released):
            return True
    return False
