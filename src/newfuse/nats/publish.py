"""Publish and await the PubAck over one wildcard inbox, as nats.py's `publish_async` does."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from newfuse.errors import (
    ClosedDuringAppendError,
    PermissionDeniedError,
    PublishTimeoutError,
    StoreClosedError,
    StoreUnavailableError,
)
from newfuse.nats import headers
from newfuse.nats.connection import on_permission_denied
from newfuse.nats.jserrors import client_error
from newfuse.nats.signing import signed


class PubAckInbox:
    """Publish-and-wait-for-PubAck over one wildcard inbox subscription.

    Cheaper than `nc.request` per publish: no subscription and no timer per request. One sweeper
    task fails the requests whose deadline passed; it sleeps until the earliest deadline, and
    when nothing is in flight until a request arrives. Once closed, the inbox refuses new
    requests at once and fails those in flight (nothing would answer them).

    `owner` names what the inbox belongs to in StoreClosedError and ClosedDuringAppendError.
    """

    def __init__(self, nc: Client, owner: str) -> None:
        self._nc = nc
        self._owner = owner
        self._closed = False
        self._prefix = ""
        self._cut = 0
        # token -> (future, subject); a token's deadline is in the heap until it is swept
        self._waiting: dict[str, tuple[asyncio.Future[bytes], str]] = {}
        self._deadlines: list[tuple[float, str, float]] = []  # a heap of (deadline, token, wait)
        self._counter = 0
        self._sleeping_until = math.inf
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] = lambda: None

    @property
    def closed(self) -> bool:
        """True once `close()` was called: nothing sent through it will be answered."""
        return self._closed

    async def start(self) -> None:
        """Subscribe to the inbox and start the sweeper.

        Raises:
            StoreClosedError: the inbox was closed.
        """
        if self._closed:
            raise StoreClosedError(store=self._owner)
        inbox = self._nc.new_inbox()
        self._prefix = inbox + "."
        self._cut = len(self._prefix)
        self._sub = await self._nc.subscribe(inbox + ".*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep(), name="newfuse-pubacks")
        self._unlisten = on_permission_denied(self._nc, self._on_denied)

    def _on_denied(self, denied: PermissionDeniedError) -> int:
        """The server refused a publish: fail at once the requests waiting on that subject
        (they would otherwise wait for a PubAck that never comes, until their timeout)."""
        failed = 0
        for future, subject in list(self._waiting.values()):
            if subject.lower() == denied.subject and not future.done():  # nats-py lower-cases
                future.set_exception(
                    PermissionDeniedError(
                        identity=denied.identity, operation=denied.operation, subject=subject
                    )
                )
                failed += 1
        return failed

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[self._cut :], None)
        if waiting is None or waiting[0].done():
            return
        if msg.headers and msg.headers.get(headers.STATUS) == "503":
            waiting[0].set_exception(
                StoreUnavailableError(
                    operation="publish",
                    reason="no JetStream stream answered (is the server restarting?)",
                )
            )
        else:
            waiting[0].set_result(msg.data)

    async def request(
        self,
        subject: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float,  # noqa: ASYNC109 - a deadline for the answer, as in nats.py's publish
    ) -> bytes:
        """Publish `body` to `subject` and return the answer's body (a PubAck, or an error).

        Raises:
            PublishTimeoutError: no answer within `timeout` (the message may be stored).
            StoreUnavailableError: the client could not publish, or no stream answered.
            StoreClosedError: the inbox is closed; ClosedDuringAppendError if that happened
                while this request waited.
        """
        if self._closed:
            raise StoreClosedError(store=self._owner)
        self._counter += 1
        token = str(self._counter)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        waiting = self._waiting
        waiting[token] = (future, subject)
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in waiting:
            heapq.heappop(deadlines)  # answered: forget early, the heap stays short
        deadline = loop.time() + timeout
        heapq.heappush(deadlines, (deadline, token, timeout))
        if deadline < self._sleeping_until:
            self._wake.set()  # the sweeper sleeps past this deadline (or without one)
        try:
            try:
                await self._nc.publish(
                    subject,
                    body,
                    reply=self._prefix + token,
                    headers=signed(self._nc, subject, body, headers),
                )
            except NatsError as error:  # closed, or the reconnect buffer is full
                raise client_error(f"publish to {subject!r}", error) from None
            return await future
        finally:
            waiting.pop(token, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by close() while publishing: retrieved, not logged

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        deadlines, waiting, wake = self._deadlines, self._waiting, self._wake
        while True:
            now = loop.time()
            while deadlines and (deadlines[0][0] <= now or deadlines[0][1] not in waiting):
                _, token, timeout = heapq.heappop(deadlines)
                entry = waiting.pop(token, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_exception(PublishTimeoutError(subject=entry[1], timeout=timeout))
            self._sleeping_until = deadlines[0][0] if deadlines else math.inf
            wake.clear()
            if deadlines:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(self._sleeping_until):
                        await wake.wait()
            else:
                await wake.wait()

    async def close(self) -> None:
        """Refuse new requests, fail those in flight, stop the sweeper, unsubscribe. Idempotent."""
        self._closed = True  # before any await: no request registers after this
        self._unlisten()
        for future, subject in self._waiting.values():
            if not future.done():
                future.set_exception(ClosedDuringAppendError(store=self._owner, subject=subject))
        self._waiting.clear()
        self._deadlines.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
