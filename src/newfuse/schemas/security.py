"""Security events: identities made and revoked, refusals the bus saw (security/events.py), and
logins nats-server refused (security/auth_events.py).

They sit on streams of the `security` category beside `security.keys` (`key.forgotten`), so
one category filter (`read_all(categories=("security",))`) lists what happened to who may do
what; the one exception is a receiving agent's `permission.denied` of a message, stored on its
own `agent.<type>-<key>` stream (see PermissionDenied), which `fuse audit security` lists too.
"""

from __future__ import annotations

from typing import Final

import msgspec

from newfuse.schemas.payloads import Timestamp, utcnow

IDENTITIES_STREAM: Final[str] = "security.identities"
"""The stream of identity events: who made or revoked which identity, and when."""
DENIALS_STREAM: Final[str] = "security.denials"
"""The stream of permission denials the bus's own connections saw."""


class IdentityCreated(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `identity.created`: an identity was made (`fuse auth add`). Never holds its seed.

    Attributes:
        name: the identity's name (its credentials file's).
        role: admin, service or agent.
        key: its public nkey (`U…`).
        agent: `<type>/<key>` of an agent identity.
        send_to: the agent types whose inboxes it may write to.
        groups: the review groups its certificate names (a reviewer's or an admin's).
        by: who made it (`--as`, else the OS user).
        created_at: when the identity says it was made (its record's time).
    """

    name: str
    role: str
    key: str
    agent: str = ""
    send_to: list[str] = msgspec.field(name="sendTo", default_factory=list)
    groups: list[str] = msgspec.field(default_factory=list)
    by: str
    created_at: Timestamp = msgspec.field(name="createdAt", default_factory=utcnow)
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class IdentityRevoked(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `identity.revoked`: an identity was revoked (`fuse auth revoke`): left out of the
    server's authorization, its credentials deleted."""

    name: str
    key: str
    by: str
    revoked_at: Timestamp = msgspec.field(name="revokedAt", default_factory=utcnow)
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class PermissionDenied(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `permission.denied`: an identity was refused an operation on a subject.

    Two enforcers write it. nats-server refuses a publish or subscribe (`operation` `publish
    to` / `subscribe to`), reported on one of the bus's own connections and stored on
    `security.denials`. A receiving agent's runtime refuses a message its policy does not
    accept (`operation` `send`, `subject` the one it came on, `message_type` its type,
    `identity` the signer or, on a bus without identities, the sender it claims); the runtime
    stores it on the receiving instance's own stream `agent.<type>-<key>`, the one stream an
    agent identity may write (security/identities.py).

    One event stands for `count` refusals of the same identity, operation, subject and message
    type since `first_at` (a loop of refusals makes at most one event a minute, see
    security/events.py).
    """

    identity: str
    operation: str
    subject: str
    count: int = 1
    first_at: Timestamp = msgspec.field(name="firstAt", default_factory=utcnow)
    seen_by: str = msgspec.field(name="seenBy", default="")
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)
    message_type: str = msgspec.field(name="messageType", default="")


# -- authentication failures (security/auth_events.py) -----------------------------------------

AUTH_FAILURES_STREAM: Final[str] = "security.auth"
"""The stream of authentication failures nats-server reported to its system account."""


class AuthFailed(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `auth.failed`: nats-server refused a connection at login.

    One event stands for `count` refusals of the same presented user from the same address
    between `first_at` and `last_at` (a client that keeps trying makes at most one event a
    minute, see security/auth_events.py). The texts come from the client through the server's
    advisory, so they are clamped and control characters escaped.

    Attributes:
        presented: the user name or public nkey the client presented ('' if none;
            nats-server writes `[REDACTED]` for a token).
        identity: the known identity whose public nkey that is, revoked or not ('' if none).
        address: the client's remote host.
        reason: why the server refused it (`Authentication Failure`).
        client_name: the connection name the client gave.
        client_library: the client's language and version (`python3 2.16.0`).
        server: the name of the server that refused it.
        count: refusals this event stands for.
        first_at: when the server refused the first of them.
        last_at: when it refused the last.
        seen_by: who recorded them (`fuse dev`).
    """

    presented: str
    identity: str = ""
    address: str = ""
    reason: str = ""
    client_name: str = msgspec.field(name="clientName", default="")
    client_library: str = msgspec.field(name="clientLibrary", default="")
    server: str = ""
    count: int = 1
    first_at: Timestamp = msgspec.field(name="firstAt", default_factory=utcnow)
    last_at: Timestamp = msgspec.field(name="lastAt", default_factory=utcnow)
    seen_by: str = msgspec.field(name="seenBy", default="")
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


SECURITY_TYPES: Final[dict[str, type[msgspec.Struct]]] = {
    "identity.created": IdentityCreated,
    "identity.revoked": IdentityRevoked,
    "permission.denied": PermissionDenied,
    "auth.failed": AuthFailed,
}
"""The security event types and their payloads (version 1 each); `key.forgotten` is sealed.py's."""
