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
at most one event per `WINDOW` seconds, which counts the refusals since the previous one (a
count still pending goes out when its window is over, or at close). At most `MAX_TRACKED` of
them are tracked at once; beyond, a new one is counted under `OTHERS` (identity and subject `*`,
one such entry per operation). So a recorder writes at most `MAX_TRACKED` + one per operation
events a window, however many identities a flood claims (security/_tally.py, which the
`auth.failed` recorder shares).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Final

from newfuse.errors import PermissionDeniedError
from newfuse.eventstore import EventStore
from newfuse.schemas import (
    DENIALS_STREAM,
    IDENTITIES_STREAM,
    IdentityCreated,
    IdentityRevoked,
    NewEvent,
    PermissionDenied,
)
from newfuse.security._tally import Batch, BoundedRecorder, clamp
from newfuse.security.identities import Identity

WINDOW: Final[float] = 60.0
"""Seconds within which refusals of one identity, operation and subject make one event."""
MAX_TRACKED: Final[int] = 256
"""(identity, operation, subject, message type) keys tracked at once by one recorder."""
OTHERS: Final[str] = "*"
"""The identity and subject of the refusals counted beyond `MAX_TRACKED` keys."""


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
                    groups=list(identity.groups),
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


_Key = tuple[str, str, str, str]
"""(identity, operation, subject, message type)."""


def _others(key: _Key) -> _Key:
    return (OTHERS, key[1], OTHERS, "")


class DenialRecorder(BoundedRecorder[_Key, None]):
    """Appends `permission.denied` to `stream` (default `security.denials`) for the refusals
    reported on `store`'s connection (`start()`: a JetStream store opened with credentials; a
    no-op otherwise) and for those passed to `record`. `close()` writes out the refusals
    counted and not yet written."""

    def __init__(
        self,
        store: EventStore,
        *,
        seen_by: str,
        stream: str = DENIALS_STREAM,
        window: float = WINDOW,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        super().__init__(
            store,
            stream=stream,
            seen_by=seen_by,
            what="permission.denied",
            overflow=_others,
            window=window,
            max_tracked=max_tracked,
        )
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
        """Count one refusal (call from a running event loop); see BoundedRecorder.count. The
        names are clamped: a claimed identity is whatever a stranger wrote."""
        self.count((clamp(identity), operation, clamp(subject), clamp(message_type)), None)

    async def _payload(self, batch: Batch[_Key, None]) -> PermissionDenied:
        identity, operation, subject, message_type = batch.key
        return PermissionDenied(
            identity=identity,
            operation=operation,
            subject=subject,
            message_type=message_type,
            count=batch.count,
            first_at=batch.first,
            seen_by=self.seen_by,
        )

    async def close(self) -> None:
        """Stop listening; write out what was counted and wait for the appends (5 s at most)."""
        remove, self._remove = self._remove, None
        if callable(remove):
            remove()
        await super().close()
