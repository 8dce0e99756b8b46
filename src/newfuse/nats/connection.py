"""Connecting to NATS: reconnect forever once connected, log (never print) connection events;
TLS checked against a CA of the caller's (nats/tls.py) when one is given."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import nats
from nats.aio.client import Client

from newfuse.errors import (
    ConfigError,
    ConnectionLostError,
    PermissionDeniedError,
    UntrustedServerError,
)
from newfuse.nats.signing import Signer, Trust, sign_on, trust_on
from newfuse.nats.tls import client_context

log = logging.getLogger("newfuse.nats")

_listeners: weakref.WeakKeyDictionary[Client, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)
_T = TypeVar("_T")
_R = TypeVar("_R")
_RECANCEL = 0.5
"""Seconds a cancelled operation has to end before it is cancelled again (see `_unless`)."""
_ABANDON_WITHIN = 2.0
"""Seconds the close of a client that never connected may take (see `_abandon`)."""
_REFUSED_LOGINS = 3
"""Authorization violations on a first connect that end it (about half a second of attempts:
a login that races the server's reload of its authorization is refused once, not three
times in a row)."""

_TLS_EOF_NOISE = "returning true from eof_received() has no effect when using ssl"


class _TLSEofNoise(logging.Filter):
    """Drops asyncio's warning at the close of each TLS connection of nats-py.

    nats-py upgrades a connection with `loop.start_tls` and a new StreamReaderProtocol, which
    asyncio does not tell it is over SSL (no `connection_made`); at the server's EOF that
    protocol asks to keep the transport half open, which SSL cannot, and asyncio says so. The
    connection closes as it should: the line is noise on every `fuse` command's stderr.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _TLS_EOF_NOISE


_tls_eof_noise = _TLSEofNoise()
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.I)


@dataclass(frozen=True)
class Credentials:
    """How a connection proves who it is: an nkey seed (`SU…`, never sent: the server checks
    a signature of its nonce), the identity's name, and the inbox prefix its permissions let it
    subscribe to (`_INBOX_<name>`)."""

    identity: str
    seed: str = field(repr=False)
    inbox_prefix: str
    scoped: bool = False
    """Its permissions let it read only its own subjects (an agent's), not the log."""
    certificate: str = ""
    """Who it is, signed by an admin (nats/signing.py): what its messages carry."""
    trust: tuple[str, ...] = ()
    """The admins' public nkeys whose certificates it accepts on what it reads."""
    ca: str = ""
    """The CA certificate (PEM) the server's TLS certificate must be signed by; a relative
    path is relative to the credentials file. Empty: no TLS unless asked for otherwise."""

    @classmethod
    def load(cls, path: str | Path) -> Credentials:
        """Read a credentials file (`fuse auth add` writes them: JSON with identity, seed,
        inbox_prefix, scoped, and optionally `ca`); refuses one that others may read.

        Raises:
            ConfigError: the file is missing, unreadable, open to others, or malformed.
        """
        where = Path(path)
        try:
            mode = where.stat().st_mode
            raw = where.read_bytes()
        except OSError as error:
            raise ConfigError(
                variable="FUSE_NATS_CREDENTIALS", value=str(path), reason=str(error)
            ) from None
        if mode & 0o077:
            raise ConfigError(
                variable="FUSE_NATS_CREDENTIALS",
                value=str(path),
                reason=f"others may read it (mode {mode & 0o777:o}); chmod 600 it",
            )
        try:
            loaded = msgspec.json.decode(raw, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise ConfigError(
                variable="FUSE_NATS_CREDENTIALS",
                value=str(path),
                reason=f"not a credentials file of `fuse auth add` ({error})",
            ) from None
        if loaded.ca and not Path(loaded.ca).is_absolute():
            # the file and its CA travel together: wherever they are copied, the pair works
            loaded = replace(loaded, ca=str(where.parent / loaded.ca))
        return loaded

    def save(self, path: Path) -> None:
        """Write the file `load` reads, owner-only; never overwrites one."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.json.encode(self) + b"\n")

    def __post_init__(self) -> None:
        if not self.seed.startswith("SU"):
            raise ConnectionLostError(
                server="nats-server",
                url="",
                reason=f"the seed of identity {self.identity!r} is not a user nkey seed (SU...)",
            )


class _Denials:
    """Permission violations the server reported on one connection, and who waits for them."""

    def __init__(self, identity: str, scoped: bool) -> None:
        self.identity = identity
        self.scoped = scoped
        self.listeners: list[Callable[[PermissionDeniedError], int]] = []
        """Each fails what waits on the refused subject and says how many it failed."""
        self.waiting: dict[str, list[asyncio.Future[PermissionDeniedError]]] = {}

    def report(self, operation: str, subject: str) -> None:
        """`subject` as nats-py passes it on: lower-cased (waiters are keyed so too)."""
        denied = PermissionDeniedError(
            identity=self.identity,
            operation="publish to" if operation.lower() == "publish" else "subscribe to",
            subject=subject.lower(),
        )
        told = 0
        for future in self.waiting.pop(subject.lower(), []):
            if not future.done():
                future.set_result(denied)
                told += 1
        for listener in list(self.listeners):
            told += listener(denied)
        # a refusal that failed an operation is that operation's error; others are logged
        (log.debug if told else log.error)("%s", denied)


_denials: weakref.WeakKeyDictionary[Client, _Denials] = weakref.WeakKeyDictionary()


def identity_of(nc: Client) -> str | None:
    """The identity `nc` connected as (with `Credentials`), None for an anonymous connection."""
    denials = _denials.get(nc)
    return denials.identity if denials is not None else None


def reads_own_subjects_only(nc: Client) -> bool:
    """Whether `nc`'s identity may read only its own subjects (then a store reads a stream's
    state from its last message, the one direct get such an identity is allowed)."""
    denials = _denials.get(nc)
    return denials is not None and denials.scoped


def on_permission_denied(
    nc: Client, callback: Callable[[PermissionDeniedError], int]
) -> Callable[[], None]:
    """Call `callback` with each permission violation the server reports on `nc` (a no-op on
    connections made without `Credentials`); it returns how many operations it failed with
    it. Returns a function that removes the callback."""
    denials = _denials.get(nc)
    if denials is None:
        return lambda: None
    denials.listeners.append(callback)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            denials.listeners.remove(callback)

    return remove


async def guarded(nc: Client, subject: str, operation: Awaitable[_T]) -> _T:
    """`operation` (a request or publish to `subject`), failed at once with
    PermissionDeniedError when the server refuses `subject`, not by a timeout later (nats-py
    reports a violation only to the error callback). Connections without `Credentials` run
    `operation` as it is."""
    denials = _denials.get(nc)
    if denials is None:
        return await operation
    denied: asyncio.Future[PermissionDeniedError] = asyncio.get_running_loop().create_future()
    key = subject.lower()  # nats-py lower-cases the server's error text
    waiting = denials.waiting.setdefault(key, [])
    waiting.append(denied)
    try:
        return await _unless(
            operation,
            denied,
            lambda reported: PermissionDeniedError(
                identity=reported.identity, operation=reported.operation, subject=subject
            ),
        )
    finally:
        with contextlib.suppress(ValueError):
            waiting.remove(denied)
        if not waiting and denials.waiting.get(key) is waiting:
            del denials.waiting[key]


async def _unless(
    operation: Awaitable[_T],
    refused: asyncio.Future[_R],
    error: Callable[[_R], BaseException],
) -> _T:
    """What `operation` returns, unless `refused` gets a result first: then `operation` is
    cancelled and `error(result)` raised (a refusal nats-py reports only to its error callback
    fails the operation at once instead of by a timeout)."""
    task = asyncio.ensure_future(operation)
    try:
        await asyncio.wait((task, refused), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise error(refused.result())
    finally:
        # cancelled again until it ends, and our own cancellation never swallowed: before
        # Python 3.12 asyncio.wait_for (nats-py's connect awaits it) can lose a cancellation
        # that lands as its inner future completes (CPython gh-86296), and nats-py's connect
        # loop would go on
        while not task.done():
            task.cancel()
            await asyncio.wait((task,), timeout=_RECANCEL)
        if not task.cancelled():
            task.exception()  # retrieved: asyncio logs an exception nobody looked at


def on_reconnect(nc: Client, callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` (synchronously, so it must not block) each time `nc` has reconnected and
    restored its subscriptions; returns a function that removes it again.

    nats-py takes one `reconnected_cb`: the first listener wraps whatever the client has (ours
    from `connect`, or the owner's), so every listener and that callback are called.
    """
    listeners = _listeners.get(nc)
    if listeners is None:
        listeners = _listeners[nc] = []
        previous: Callable[[], Awaitable[None]] | None = nc._reconnected_cb

        async def reconnected() -> None:
            if previous is not None:
                await previous()
            for listener in list(listeners):
                listener()

        nc._reconnected_cb = reconnected
    listeners.append(callback)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            listeners.remove(callback)

    return remove


async def connect(
    url: str,
    *,
    name: str = "newfuse",
    timeout: float = 5.0,  # noqa: ASYNC109 - bounds the first connect over all its attempts
    reconnect_wait: float = 0.25,
    credentials: Credentials | None = None,
    ca: str | Path | None = None,
) -> Client:
    """Connect to NATS and keep the connection: after the first connect it reconnects forever.

    With a CA (`ca`, else the credentials' `ca`) or a `tls://` URL the connection is TLS and
    the server's certificate is verified (against that CA only, else the system's CAs) with
    its host name; a plain `nats://` URL with a CA is upgraded the same way. A server that
    offers no TLS then is refused rather than used in plain text.

    Args:
        url: one server URL or several, comma separated (`nats://a:4222,nats://b:4222`).
        name: the connection name the server shows in its monitoring.
        timeout: seconds allowed for the first connect, over every attempt.
        reconnect_wait: seconds between reconnect attempts to one server.
        credentials: connect as this identity (nkey); without, anonymously.
        ca: the CA certificate (PEM file) the server's certificate must be signed by.

    Returns:
        A connected nats-py client; close it with `await nc.close()` (or `drain()`).

    Raises:
        ConnectionLostError: no server answered within `timeout`.
        PermissionDeniedError: the server refused the identity (or asks for one), at its
            third refusal in a row, not after `timeout`.
        UntrustedServerError: TLS was asked for and the server's certificate failed
            verification (at the first failure, not after `timeout`), or it offers no TLS.
        ConfigError: the CA file is missing, unreadable or not a PEM certificate.
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if ca is None and credentials is not None and credentials.ca:
        ca = credentials.ca
    ca_path = None if ca is None else str(ca)
    wants_tls = ca_path is not None or any(urlsplit(s).scheme == "tls" for s in servers)
    nc = Client()
    failures: list[BaseException] = []
    connected = False
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[BaseException] = loop.create_future()
    """What ends the first connect before its timeout: an error no retry can mend."""
    logins_refused = 0
    who = credentials.identity if credentials is not None else "(anonymous)"

    denials = _Denials(credentials.identity, credentials.scoped) if credentials else None

    async def on_error(error: Exception) -> None:
        nonlocal logins_refused
        if not connected:  # first connect: the error goes into ConnectionLostError instead
            failures.append(error)
            if refused.done():
                return
            # nats-py retries every failure; a certificate that failed verification fails
            # again (one deployment's servers share a CA), so it ends the connect at once, and
            # so do refused logins once they are not a reload's passing refusal
            if isinstance(error, ssl.SSLCertVerificationError):
                reason = f"its certificate failed verification ({error.verify_message or error})"
                refused.set_result(UntrustedServerError(url=url, ca=ca_path, reason=reason))
            elif "authorization violation" in str(error).lower():
                logins_refused += 1
                if logins_refused >= _REFUSED_LOGINS:
                    refused.set_result(
                        PermissionDeniedError(identity=who, operation="connect to", subject=url)
                    )
            return
        violation = _VIOLATION.search(str(error))
        if violation is not None and denials is not None:
            denials.report(violation.group(1), violation.group(2))
            return
        log.warning("nats %s: %s: %s", name, type(error).__name__, error)

    async def on_disconnected() -> None:
        if nc.is_closed:  # a deliberate close, not a lost connection
            return
        log.warning("nats %s: disconnected from %s; reconnecting", name, url)

    async def on_reconnected() -> None:
        log.info("nats %s: reconnected to %s", name, nc.connected_url or url)

    async def on_closed() -> None:
        log.debug("nats %s: connection closed", name)

    options = _auth(credentials)
    if ca_path is not None:
        options["tls"] = client_context(ca_path)
    # a server may require TLS even where none was asked for (then its certificate is checked
    # against the system's CAs): the filter goes on for every connection
    logging.getLogger("asyncio").addFilter(_tls_eof_noise)  # once: a filter is added once
    try:
        async with asyncio.timeout(timeout):
            await _unless(
                nc.connect(
                    servers,
                    name=name,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                    closed_cb=on_closed,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=reconnect_wait,  # type: ignore[arg-type]
                    connect_timeout=max(1, int(timeout)),
                    **options,
                ),
                refused,
                lambda error: error,
            )
    except (UntrustedServerError, PermissionDeniedError):
        await _abandon(nc)
        raise
    except (TimeoutError, OSError, nats.errors.Error) as error:
        await _abandon(nc)
        reason = str(failures[-1]) if failures else (str(error) or type(error).__name__)
        # the server says so once, then drops the connection: a later attempt's failure may be
        # only a reset, so any attempt refused for authorization tells
        if any("authorization violation" in str(seen).lower() for seen in (*failures, error)):
            raise PermissionDeniedError(identity=who, operation="connect to", subject=url) from None
        raise ConnectionLostError(
            server="nats-server", url=url, reason=f"no connection within {timeout:g}s ({reason})"
        ) from None
    # nats-py upgrades to TLS only when the server requires it, whatever was asked: a server
    # without TLS would otherwise carry this connection in plain text
    if wants_tls and not nc._server_info.get("tls_required"):
        await _abandon(nc)
        raise UntrustedServerError(
            url=url, ca=ca_path, reason="it offers no TLS (a plain nats-server, or a proxy)"
        )
    connected = True
    if credentials is not None and denials is not None:
        _denials[nc] = denials
        if credentials.certificate:
            sign_on(nc, Signer(credentials.seed, credentials.certificate))
        if credentials.trust:
            trust_on(nc, Trust(credentials.trust))
    return nc


async def _abandon(nc: Client) -> None:
    """Close a client whose first connect failed, giving up after `_ABANDON_WITHIN` seconds.

    nats-py's close closes the socket, then waits for the transport to report it closed. After
    a TLS connect the server refused (Authorization Violation) on a busy event loop, that
    report was seen never to come, and the close waited forever; only that wait is cut short.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_ABANDON_WITHIN):
            await nc.close()


def _auth(credentials: Credentials | None) -> dict[str, Any]:
    if credentials is None:
        return {}
    return {"nkeys_seed_str": credentials.seed, "inbox_prefix": credentials.inbox_prefix}
