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
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Final, NamedTuple, Self

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from newfuse.errors import FuseError
from newfuse.eventstore import EventStore
from newfuse.nats.connection import Credentials
from newfuse.schemas import AUTH_FAILURES_STREAM, AuthFailed, NewEvent
from newfuse.schemas.payloads import utcnow

log = logging.getLogger("newfuse.security")

ADVISORIES: Final[str] = "$SYS.SERVER.*.CLIENT.AUTH.ERR"
"""Where every server of the system account's cluster reports the logins it refused."""
WINDOW: Final[float] = 60.0
"""Seconds within which the refusals of one presented user from one address make one event."""
MAX_TRACKED: Final[int] = 256
"""(presented, address) pairs tracked at once; refusals beyond are counted under `OTHERS`."""
OTHERS: Final[tuple[str, str]] = ("*", "*")
"""The pair the refusals beyond `MAX_TRACKED` pairs are counted under."""
MAX_TEXT: Final[int] = 256
"""Characters kept of each text an advisory carries."""
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


def clamp(text: str) -> str:
    """`text` fit for the log and a terminal: control characters escaped, at most `MAX_TEXT`
    characters (the cut marked with '…')."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: MAX_TEXT + 1])
    return shown if len(shown) <= MAX_TEXT else shown[: MAX_TEXT - 1] + "…"


def _when(text: str) -> datetime:
    """The advisory's time (RFC 3339 with nanoseconds), else now."""
    with contextlib.suppress(msgspec.ValidationError):
        when = msgspec.convert(text, datetime)
        if when.tzinfo is not None:
            return when
    return utcnow()


class _Tally:
    """The refusals of one (presented, address) pair not written yet, and when it last wrote."""

    __slots__ = ("count", "first", "last", "sample", "written")

    def __init__(self) -> None:
        self.count = 0
        self.first = self.last = utcnow()
        self.sample = _Advisory(client=_Client())
        self.written = -math.inf  # monotonic time of its last event: the first goes out at once

    def add(self, advisory: _Advisory, when: datetime) -> None:
        if not self.count:
            self.first = when
        self.count += 1
        self.last = when
        self.sample = advisory


class _Batch(NamedTuple):
    """What one event says: a pair's refusals counted since its previous event."""

    key: tuple[str, str]
    refusals: int
    first: datetime
    last: datetime
    sample: _Advisory


class AuthFailureRecorder:
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
        self.store = store
        self.system = system
        self.seen_by = seen_by
        self.identify = identify
        self.window = window
        self.max_tracked = max_tracked
        self.heard = 0
        """Refusals heard of (advisories understood)."""
        self.skipped = 0
        """Messages on the advisories' subject that were not an advisory we understand."""
        self.written = 0
        """Events appended."""
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._due: list[_Batch] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._subscription: Any = None
        self._writer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._subscription = await self.system.subscribe(ADVISORIES, cb=self._heard)
        await self.system.flush()  # the server knows of the interest before we return
        self._writer = asyncio.create_task(self._write_loop(), name="record auth failures")
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening; write out what was counted and wait for it (5 s at most)."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):  # the connection may be closed already
                await subscription.unsubscribe()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._closing = True
        self._wake.set()
        done, _ = await asyncio.wait({writer}, timeout=5.0)
        if not done:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            log.warning("auth.failed: the store did not take the last counts within 5 s")
        elif writer.exception() is not None:  # it stopped early: say why, once
            log.error("auth.failed: recording stopped: %r", writer.exception())

    async def _heard(self, msg: Msg) -> None:
        advisory = self._parse(msg)
        if advisory is not None:
            self.heard += 1
            self.count(advisory)

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

    def count(self, advisory: _Advisory) -> None:
        """Count one refusal; queue its pair's event if the pair's window is over."""
        key = (clamp(advisory.client.user), clamp(advisory.client.host))
        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= self.max_tracked:
                key = OTHERS
            tally = self._tallies.setdefault(key, _Tally())
        tally.add(advisory, _when(advisory.timestamp))
        if time.monotonic() - tally.written >= self.window:
            self._queue(key, tally)

    def _queue(self, key: tuple[str, str], tally: _Tally) -> None:
        self._due.append(_Batch(key, tally.count, tally.first, tally.last, tally.sample))
        tally.count, tally.written = 0, time.monotonic()
        self._wake.set()

    def _sweep(self) -> None:
        """Queue the pending counts whose window is over; forget pairs quiet for a window."""
        now = time.monotonic()
        for key, tally in list(self._tallies.items()):
            if now - tally.written < self.window:
                continue
            if tally.count:
                self._queue(key, tally)
            else:
                del self._tallies[key]

    async def _write_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.window / 4):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                for key, tally in self._tallies.items():
                    if tally.count:
                        self._queue(key, tally)
                self._tallies.clear()
            else:
                self._sweep()
            due, self._due = self._due, []
            for batch in due:
                await self._append(await self._event(batch))
            if self._closing:
                return

    async def _event(self, batch: _Batch) -> AuthFailed:
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
            count=batch.refusals,
            first_at=batch.first,
            last_at=batch.last,
            seen_by=self.seen_by,
        )

    async def _append(self, event: AuthFailed) -> None:
        try:
            await self.store.append(
                AUTH_FAILURES_STREAM, NewEvent(data=event, metadata={"sender": self.seen_by})
            )
            self.written += 1
        except FuseError as error:  # refused, or the store is down: say so, go on
            log.warning("auth.failed of %s not recorded: %s", event.presented, error)


@contextlib.asynccontextmanager
async def recording_auth_failures(
    url: str,
    credentials: Credentials,
    store: EventStore,
    *,
    seen_by: str,
    identify: Callable[[str], str] | None = None,
) -> AsyncIterator[AuthFailureRecorder]:
    """An `AuthFailureRecorder` on a connection of its own, as the `system` identity of
    `credentials`, closed on the way out."""
    from newfuse.nats import connect

    nc = await connect(url, name=f"{seen_by} (auth failures)", credentials=credentials)
    try:
        async with AuthFailureRecorder(store, nc, seen_by=seen_by, identify=identify) as recorder:
            yield recorder
    finally:
        await nc.close()
