"""Logins nats-server refused, as `auth.failed` events in the log.

nats-server tells no one but its system account that it refused a login: it publishes an
advisory (type `io.nats.server.advisory.v1.client_disconnect`, reason `Authentication Failure`)
on `$SYS.SERVER.<server id>.CLIENT.AUTH.ERR`, whose `client` names what the client presented
(`user`: a user name, a public nkey, `[REDACTED]` for a token), its address (`host`), its
connection name and library. `AuthFailureRecorder` listens there on a connection of a `system`
identity (security/identities.py) and appends `auth.failed` to `security.auth`.

The advisory carries what a stranger sent, so it is foreign input: a message that is not such
an advisory (not JSON, a field of the wrong type, no `client`, more than `MAX_ADVISORY` bytes)
is reported and skipped, and each text is clamped to `MAX_TEXT` characters with its control
characters escaped (it ends up in a terminal table).

A client that keeps trying cannot flood the log: one presented user from one address makes at
most one event per `WINDOW` seconds, which counts the refusals since the previous one, and at
most `MAX_TRACKED` of them are tracked at once; refusals beyond are counted together under
`*` from `*`. So a window holds at most `MAX_TRACKED + 1` events, however many names a
password sprayer tries. Counts still pending are written once their window is over, and on
close (which may add one more per pair).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Final, Self

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from newfuse.errors import FuseError
from newfuse.eventstore import EventStore
from newfuse.nats.connection import Credentials
from newfuse.schemas import AUTH_FAILURES_STREAM, AuthFailed
from newfuse.schemas.payloads import utcnow
from newfuse.security._tally import MAX_TEXT as MAX_TEXT  # the bound its docstring names
from newfuse.security._tally import Batch, BoundedRecorder, clamp

log = logging.getLogger("newfuse.security")

ADVISORIES: Final[str] = "$SYS.SERVER.*.CLIENT.AUTH.ERR"
"""Where every server of the system account's cluster reports the logins it refused."""
WINDOW: Final[float] = 60.0
"""Seconds within which the refusals of one presented user from one address make one event."""
MAX_TRACKED: Final[int] = 256
"""(presented, address) pairs tracked at once; refusals beyond are counted under `OTHERS`."""
OTHERS: Final[tuple[str, str]] = ("*", "*")
"""The pair the refusals beyond `MAX_TRACKED` pairs are counted under."""
MAX_ADVISORY: Final[int] = 64 * 1024
"""Bytes an advisory may have (a real one has about 1 KiB; a login line at most 4 KiB)."""


class _Client(msgspec.Struct):
    host: str = ""
    user: str = ""
    name: str = ""
    lang: str = ""
    ver: str = ""


class _Server(msgspec.Struct):
    name: str = ""


class _Advisory(msgspec.Struct):
    """The part of nats-server's advisory we read; unknown fields are ignored."""

    client: _Client
    server: _Server = msgspec.field(default_factory=_Server)
    reason: str = ""
    timestamp: str = ""


_decoder: Final = msgspec.json.Decoder(_Advisory)


def _when(text: str) -> datetime:
    """The advisory's time (RFC 3339 with nanoseconds), else now."""
    with contextlib.suppress(msgspec.ValidationError):
        when = msgspec.convert(text, datetime)
        if when.tzinfo is not None:
            return when
    return utcnow()


_Pair = tuple[str, str]
"""(presented user, address)."""


class AuthFailureRecorder(BoundedRecorder[_Pair, _Advisory]):
    """Appends `auth.failed` to `store` for each login refusal `system` hears of (a connection
    of a `system` identity, which the caller owns). An async context manager: leaving it stops
    listening and writes out the refusals counted and not written yet.

    Args:
        store: where the events go (a store of the bus, e.g. an admin's).
        system: a connection to nats-server's system account.
        seen_by: who records them, in each event (`fuse dev`).
        identify: the name of the identity whose public nkey a client presented ('' for none);
            run in a thread, once per event.
        window: seconds within which one pair's refusals make one event.
        max_tracked: pairs tracked at once.
    """

    def __init__(
        self,
        store: EventStore,
        system: Client,
        *,
        seen_by: str,
        identify: Callable[[str], str] | None = None,
        window: float = WINDOW,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        super().__init__(
            store,
            stream=AUTH_FAILURES_STREAM,
            seen_by=seen_by,
            what="auth.failed",
            overflow=lambda _: OTHERS,
            window=window,
            max_tracked=max_tracked,
        )
        self.system = system
        self.identify = identify
        self.heard = 0
        """Refusals heard of (advisories understood)."""
        self.skipped = 0
        """Messages on the advisories' subject that were not an advisory we understand."""
        self._subscription: Any = None

    async def __aenter__(self) -> Self:
        self._subscription = await self.system.subscribe(ADVISORIES, cb=self._heard)
        await self.system.flush()  # the server knows of the interest before we return
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening; write out what was counted and wait for it (5 s at most)."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):  # the connection may be closed already
                await subscription.unsubscribe()
        await super().close()

    async def _heard(self, msg: Msg) -> None:
        advisory = self._parse(msg)
        if advisory is not None:
            self.heard += 1
            self.count(
                (clamp(advisory.client.user), clamp(advisory.client.host)),
                advisory,
                _when(advisory.timestamp),
            )

    def _parse(self, msg: Msg) -> _Advisory | None:
        reason = None
        if len(msg.data) > MAX_ADVISORY:
            reason = f"{len(msg.data)} bytes, more than {MAX_ADVISORY}"
        else:
            try:
                return _decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                reason = clamp(str(error))
        self.skipped += 1
        log.warning("skipped a message on %s: not an auth-error advisory (%s)", msg.subject, reason)
        return None

    async def _payload(self, batch: Batch[_Pair, _Advisory]) -> AuthFailed:
        presented, address = batch.key
        identity = ""
        if self.identify is not None and batch.key != OTHERS:
            try:
                identity = clamp(await asyncio.to_thread(self.identify, presented))
            except FuseError as error:  # the identities cannot be read: the event says less
                log.warning("auth.failed: who is %s not known: %s", presented, error)
        client = batch.sample.client
        return AuthFailed(
            presented=presented,
            identity=identity,
            address=address,
            reason=clamp(batch.sample.reason),
            client_name=clamp(client.name),
            client_library=clamp(f"{client.lang} {client.ver}".strip()),
            server=clamp(batch.sample.server.name),
            count=batch.count,
            first_at=batch.first,
            last_at=batch.last,
            seen_by=self.seen_by,
        )


@contextlib.asynccontextmanager
async def recording_auth_failures(
    url: str,
    credentials: Credentials,
    store: EventStore,
    *,
    seen_by: str,
    identify: Callable[[str], str] | None = None,
    ca: str | None = None,
) -> AsyncIterator[AuthFailureRecorder]:
    """An `AuthFailureRecorder` on a connection of its own, as the `system` identity of
    `credentials` (over TLS verified with `ca` when given), closed on the way out."""
    from newfuse.nats import connect

    nc = await connect(url, name=f"{seen_by} (auth failures)", credentials=credentials, ca=ca)
    try:
        async with AuthFailureRecorder(store, nc, seen_by=seen_by, identify=identify) as recorder:
            yield recorder
    finally:
        await nc.close()
