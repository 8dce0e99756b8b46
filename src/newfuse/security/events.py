"""Security events in the log: identities made and revoked, permission denials the bus saw.

Identities live in files (`fuse auth`, security/identities.py); the log is where what happened
to them is kept. `sync_identities` appends `identity.created` for each identity the log has not
recorded yet and `identity.revoked` for each revoked one, so it is idempotent: `fuse auth
add|revoke` calls it when the bus is reachable, `fuse dev --secure` when it starts (an identity
made while no bus ran is recorded then, with the time the identity says it was made).

`DenialRecorder` appends `permission.denied` for each refusal nats-server reports on one of the
bus's own connections (an admin's or a service's: an agent identity may not write the security
streams), and for each message a receiving agent's policy denies (`record`, called by the agent
runtime, which stores them on the instance's own stream: an agent identity may write that one).
A loop of refusals cannot flood the log: one identity, operation, subject and message type make
at most one event per `WINDOW` seconds, which counts the refusals since the previous one. At
most `MAX_TRACKED` of them are tracked at once; a new one makes room by writing out and
dropping those whose window has passed, and when every tracked one wrote within its window,
it is counted under `OTHERS` (identity and subject `*`, one such entry per operation). So a
recorder writes at most `MAX_TRACKED` + one per operation events a window, however many
identities a flood claims.
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
"""(identity, operation, subject, message type) keys tracked at once by one recorder."""
OTHERS: Final[str] = "*"
"""The identity and subject of the refusals counted beyond `MAX_TRACKED` keys."""

_Key = tuple[str, str, str, str]


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
        self.written = float("-inf")  # monotonic time of its last event: none yet


class DenialRecorder:
    """Appends `permission.denied` to `stream` (default `security.denials`) for the refusals
    reported on `store`'s connection (`start()`: a JetStream store opened with credentials; a
    no-op otherwise) and for those passed to `record`. `close()` writes out the refusals
    counted and not yet written."""

    def __init__(self, store: EventStore, *, seen_by: str, stream: str = DENIALS_STREAM) -> None:
        self.store = store
        self.seen_by = seen_by
        self.stream = stream
        self.written = 0
        """Events appended."""
        self._seen: dict[_Key, _Seen] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._remove: object = None

    def start(self) -> DenialRecorder:
        from newfuse.nats.connection import on_permission_denied

        nc = getattr(self.store, "nc", None)
        if nc is not None:
            self._remove = on_permission_denied(nc, self._denied)
        return self

    def _denied(self, error: PermissionDeniedError) -> int:
        self.record(identity=error.identity, operation=error.operation, subject=error.subject)
        return 0  # it fails no operation: it only records

    def record(
        self, *, identity: str, operation: str, subject: str, message_type: str = ""
    ) -> None:
        """Count one refusal; append its event now unless this key had one within `WINDOW`
        (the append runs in the background: call from a running event loop)."""
        key = (identity, operation, subject, message_type)
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= MAX_TRACKED:
                self._make_room()
            if len(self._seen) >= MAX_TRACKED:
                key = (OTHERS, operation, OTHERS, "")
            seen = self._seen.setdefault(key, _Seen())
        seen.count += 1
        if time.monotonic() - seen.written >= WINDOW:
            self._write(key, seen)

    def _make_room(self) -> None:
        """Write out and forget the keys whose window has passed: their next refusal may be
        written at once anyway, so forgetting them loosens no bound."""
        now = time.monotonic()
        for key, seen in list(self._seen.items()):
            if now - seen.written >= WINDOW:
                self._write(key, seen)
                del self._seen[key]

    def _write(self, key: _Key, seen: _Seen) -> None:
        if not seen.count:
            return
        event = PermissionDenied(
            identity=key[0],
            operation=key[1],
            subject=key[2],
            message_type=key[3],
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
                self.stream, NewEvent(data=event, metadata={"sender": self.seen_by})
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
