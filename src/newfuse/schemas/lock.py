"""Lock events: each named resource is a stream `lock.<resource>` whose fold says who holds it
and who waits for it (core/locks.py).

Every event is appended with the stream's expected version, so two grants never coexist: a
`lock.granted` is stored only on the version at which the lock was free. The grant's stream
version is its fencing token (monotonic per resource): a holder's later writes elsewhere can
carry it, and a write with a lower token than one already seen is a stale holder's.
"""

from __future__ import annotations

from typing import Final

import msgspec

from newfuse.schemas.payloads import Timestamp, utcnow


class LockRequested(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `lock.requested`: saga `sagaId`'s step `step` waits for `resource`."""

    resource: str
    saga_id: str = msgspec.field(name="sagaId")
    step: str
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class LockGranted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `lock.granted`: saga `sagaId` holds `resource` (exclusively) from now; `token` is
    this event's stream version, the fencing token of the grant."""

    resource: str
    saga_id: str = msgspec.field(name="sagaId")
    step: str
    token: int
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class LockReleased(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `lock.released`: saga `sagaId` let go of `resource`: the grant of `token`, or (token
    0) its request, withdrawn before a grant. `reason` says why (committed, rolled back, ...).
    `final`: the saga committed or rolled back, so it asks for the resource no more; a request
    or grant in its name after this one comes from an orchestrator that has not seen the end,
    and is not written."""

    resource: str
    saga_id: str = msgspec.field(name="sagaId")
    token: int = 0
    reason: str = ""
    final: bool = False
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


LOCK_TYPES: Final[dict[str, type[msgspec.Struct]]] = {
    "lock.requested": LockRequested,
    "lock.granted": LockGranted,
    "lock.released": LockReleased,
}
"""The lock event types and their payloads (version 1 each)."""
