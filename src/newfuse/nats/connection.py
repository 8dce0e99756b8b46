"""Connecting to NATS: reconnect forever once connected, log (never print) connection events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client

from newfuse.errors import ConnectionLostError

log = logging.getLogger("newfuse.nats")

_listeners: weakref.WeakKeyDictionary[Client, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


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
) -> Client:
    """Connect to NATS and keep the connection: after the first connect it reconnects forever.

    Args:
        url: one server URL or several, comma separated (`nats://a:4222,nats://b:4222`).
        name: the connection name the server shows in its monitoring.
        timeout: seconds allowed for the first connect, over every attempt.
        reconnect_wait: seconds between reconnect attempts to one server.

    Returns:
        A connected nats-py client; close it with `await nc.close()` (or `drain()`).

    Raises:
        ConnectionLostError: no server answered within `timeout`.
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    nc = Client()
    failures: list[BaseException] = []
    connected = False

    async def on_error(error: Exception) -> None:
        if not connected:  # first connect: the error goes into ConnectionLostError instead
            failures.append(error)
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

    try:
        async with asyncio.timeout(timeout):
            await nc.connect(
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
            )
    except (TimeoutError, OSError, nats.errors.Error) as error:
        with contextlib.suppress(Exception):
            await nc.close()
        reason = str(failures[-1]) if failures else (str(error) or type(error).__name__)
        raise ConnectionLostError(
            server="nats-server", url=url, reason=f"no connection within {timeout:g}s ({reason})"
        ) from None
    connected = True
    return nc
