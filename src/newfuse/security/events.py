"""Security events in the log: identities made and revoked, permission denials the bus saw.

Identities live in files (`fuse auth`, security/identities.py); the log is where what happened
to them is kept. `sync_identities` appends `identity.created` for each identity the log has not
recorded yet and `identity.revoked` for each revoked one, so it is idempotent: `fuse auth
add|revoke` calls it when the bus is reachable, `fuse dev --secure` when it starts (an identity
made while no bus ran is recorded then, with the time the identity says it was made).

`DenialRecorder` appends `permission.denied` for each refusal nats-server reports on one of the
bus's own connections (an admin's or a service's: an agent identity may not write the security
streams). A loop of refusals cannot flood the log: one identity, operation and subject make at
most one event per `WINDOW` seconds, which counts the refusals since the previous one; at most
`MAX_TRACKED` of them are tracked at once (beyond, the oldest are written out first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Final

from newfuse.errors import FuseError, PermissionDeniedError
from newfuse.eventstore import EventStore
from newfuse.schemas import (
    DENIALS_STREAM,
    IDENTITIES_STREAM,
    IdentityCreated,
    IdentityRevoked,
    NewEvent,
    PermissionDenied,
)
from newfuse.security.identities import Identity

log = logging.getLogger("newfuse.security")

WINDOW: Final[float] = 60.0
"""Seconds within which refusals of one identity, operation and subject make one event."""
MAX_TRACKED: Final[int] = 256
"""(identity, operation, subject) triples tracked at once by one recorder."""


def _time(text: str | None) -> datetime:
    if text:
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(text)
            return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return datetime.now(UTC)


async def sync_identities(store: EventStore, identities: list[Identity], *, by: str) -> int:
    """Append what the log does not hold yet of `identities`: `identity.created` for each
    (name, key) never recorded, `identity.revoked` for each revoked one not recorded as such.
    Returns how many events it appended."""
    created: set[tuple[str, str]] = set()
    revoked: set[tuple[str, str]] = set()
    async for event in store.read(IDENTITIES_STREAM):
        data = event.data
        if isinstance(data, IdentityCreated):
            created.add((data.name, data.key))
        elif isinstance(data, IdentityRevoked):
            revoked.add((data.name, data.key))
    events: list[IdentityCreated | IdentityRevoked] = []
    for identity in identities:
        which = (identity.name, identity.public_key)
        if which not in created:
            events.append(
                IdentityCreated(
                    name=identity.name,
                    role=identity.role,
                    key=identity.public_key,
                    agent=f"{identity.agent_type}/{identity.agent_key}"
                    if identity.agent_type
                    else "",
                    send_to=list(identity.send_to),
                    by=by,
                    created_at=_time(identity.created),
                )
            )
        if identity.revoked and which not in revoked:
            events.append(
                IdentityRevoked(
                    name=identity.name,
                    key=identity.public_key,
                    by=by,
                    revoked_at=_time(identity.revoked),
                )
            )
    for payload in events:  # one by one: each stays under the store's batch limits
        await store.append(IDENTITIES_STREAM, NewEvent(data=payload, metadata={"sender": by}))
    return len(events)


class _Seen:
    __slots__ = ("count", "first", "written")

    def __init__(self) -> None:
        self.count = 0
        self.first = datetime.now(UTC)
        self.written = 0.0


class DenialRecorder:
    """Appends `permission.denied` for the refusals reported on `store`'s connection (a
    JetStream store opened with credentials; a no-op otherwise). Use `start()` and `close()`
    (which writes out the refusals counted and not yet written)."""

    def __init__(self, store: EventStore, *, seen_by: str) -> None:
        self.store = store
        self.seen_by = seen_by
        self.written = 0
        """Events appended."""
        self._seen: dict[tuple[str, str, str], _Seen] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._remove: object = None

    def start(self) -> DenialRecorder:
        from newfuse.nats.connection import on_permission_denied

        nc = getattr(self.store, "nc", None)
        if nc is not None:
            self._remove = on_permission_denied(nc, self._denied)
        return self

    def _denied(self, error: PermissionDeniedError) -> int:
        key = (error.identity, error.operation, error.subject)
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= MAX_TRACKED:
                oldest = next(iter(self._seen))
                self._write(oldest, self._seen.pop(oldest))
            seen = self._seen[key] = _Seen()
        seen.count += 1
        if time.monotonic() - seen.written >= WINDOW:
            self._write(key, seen)
        return 0  # it fails no operation: it only records

    def _write(self, key: tuple[str, str, str], seen: _Seen) -> None:
        if not seen.count:
            return
        event = PermissionDenied(
            identity=key[0],
            operation=key[1],
            subject=key[2],
            count=seen.count,
            first_at=seen.first,
            seen_by=self.seen_by,
        )
        seen.count, seen.first, seen.written = 0, datetime.now(UTC), time.monotonic()
        task = asyncio.get_running_loop().create_task(self._append(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _append(self, event: PermissionDenied) -> None:
        try:
            await self.store.append(
                DENIALS_STREAM, NewEvent(data=event, metadata={"sender": self.seen_by})
            )
            self.written += 1
        except FuseError as error:  # refused too, or the store is down: say so, go on
            log.warning("permission.denied of %s not recorded: %s", event.identity, error)

    async def close(self) -> None:
        """Stop listening; write out what was counted and wait for the appends (5 s at most)."""
        remove, self._remove = self._remove, None
        if callable(remove):
            remove()
        for key, seen in list(self._seen.items()):
            self._write(key, seen)
        self._seen.clear()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
