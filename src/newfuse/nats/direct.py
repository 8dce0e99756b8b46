"""Direct get (ADR-31) on the raw nats-py client: one message, or every message of a subject.

A direct get is answered by any server holding the stream (`allow_direct`), without a consumer.
The answer carries the message with `Nats-Sequence`, `Nats-Subject` and `Nats-Time-Stamp`
headers, or a status: 404 no such message, 204 (`EOB`) the end of a batch, whose
`Nats-Num-Pending` says how many matching messages are left after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from newfuse.errors import ElectionTimeoutError, StoreUnavailableError
from newfuse.nats import headers
from newfuse.nats.connection import guarded
from newfuse.nats.election import FIRST_ATTEMPT_WAIT, ride_out
from newfuse.nats.jsapi import API
from newfuse.nats.jserrors import client_error

DIRECT_BATCH: Final = 256
"""Messages asked for per batched direct get."""


def sequence_of(msg: Msg) -> int:
    """The stream sequence of a message a direct get returned."""
    return int(msg.headers[headers.SEQUENCE]) if msg.headers else 0


class DirectGet:
    """Direct gets on one stream, each answer awaited at most `timeout` seconds.

    A request that gets no answer (a reconnect, a replica that just died) is asked again for up
    to `patience` seconds (one deadline per call; a listing resumes after the last message it
    gave). Failures raise StoreUnavailableError naming the `operation` the caller passes
    (ElectionTimeoutError once the patience is spent).
    """

    __slots__ = ("_nc", "_patience", "_subject", "_timeout")

    def __init__(self, nc: Client, stream: str, *, timeout: float, patience: float = 0.0) -> None:
        self._nc = nc
        self._subject = f"{API}.DIRECT.GET.{stream}"
        self._timeout = timeout
        self._patience = patience

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._patience

    async def get(self, operation: str, *, seq: int, next_by_subj: str | None = None) -> Msg | None:
        """The message at sequence `seq` (with `next_by_subj`: the first one on that subject at
        or after `seq`); None when there is none."""
        request: dict[str, Any] = {"seq": seq}
        if next_by_subj is not None:
            request["next_by_subj"] = next_by_subj
        return await self._one(self._subject, msgspec.json.encode(request), operation)

    async def last_for(self, subject: str, operation: str) -> Msg | None:
        """The last message on `subject`; None when it has none."""
        return await self._one(f"{self._subject}.{subject}", b"", operation)

    async def _one(self, subject: str, body: bytes, operation: str) -> Msg | None:
        try:  # the fast path: one attempt, no retry machinery
            return await self._one_attempt(
                subject, body, operation, min(self._timeout, FIRST_ATTEMPT_WAIT)
            )
        except StoreUnavailableError as error:
            return await ride_out(
                partial(self._one_attempt, subject, body, operation),
                operation=operation,
                deadline=self._deadline(),
                timeout=self._timeout,
                failed=error,
            )

    async def _one_attempt(
        self,
        subject: str,
        body: bytes,
        operation: str,
        wait: float,
    ) -> Msg | None:
        try:
            msg = await guarded(self._nc, subject, self._nc.request(subject, body, timeout=wait))
        except NatsError as error:  # timeout, no responders, connection closed, ...
            raise client_error(operation, error) from None
        status = msg.headers.get(headers.STATUS) if msg.headers else None
        if status is None:
            return msg
        if status == "404":
            return None
        raise StoreUnavailableError(
            operation=operation,
            reason=f"direct get answered {status} "
            f"{(msg.headers or {}).get(headers.DESCRIPTION, '')}",
        )

    async def messages(
        self, subject: str, operation: str, start: int = 1, *, batch: int = DIRECT_BATCH
    ) -> AsyncIterator[Msg]:
        """Every message on `subject` from sequence `start` on, in order, `batch` per request;
        the next request goes out when a batch ends with messages still pending. A batch that
        fails is asked for again from the message after the last one given, within the
        patience."""
        seq = start
        deadline = self._deadline()
        loop = asyncio.get_running_loop()
        pause, attempts = 0.05, 0
        while True:
            attempts += 1
            try:
                async with contextlib.aclosing(
                    self._messages_once(subject, operation, seq, batch)
                ) as listing:
                    async for msg in listing:
                        seq = int((msg.headers or {})[headers.SEQUENCE]) + 1
                        yield msg
                return
            except StoreUnavailableError as error:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ElectionTimeoutError(
                        operation=operation,
                        seconds=self._patience,
                        attempts=attempts,
                        last=error.reason,
                    ) from error
                await asyncio.sleep(min(pause, remaining))
                pause = min(pause * 2, 0.5)

    async def _messages_once(
        self, subject: str, operation: str, start: int, batch: int
    ) -> AsyncGenerator[Msg]:
        nc = self._nc
        inbox = nc.new_inbox()
        try:
            sub = await nc.subscribe(inbox)
        except NatsError as error:
            raise client_error(operation, error) from None
        try:
            seq = start
            while True:
                request = msgspec.json.encode({"seq": seq, "next_by_subj": subject, "batch": batch})
                try:
                    await nc.publish(self._subject, request, reply=inbox)
                except NatsError as error:  # closed, or the reconnect buffer is full
                    raise client_error(operation, error) from None
                while True:
                    try:  # a refused request fails at once (PermissionDeniedError)
                        msg = await guarded(nc, self._subject, sub.next_msg(timeout=self._timeout))
                    except NatsError as error:
                        raise client_error(operation, error) from None
                    found = msg.headers or {}
                    status = found.get(headers.STATUS)
                    if status is None:
                        seq = int(found[headers.SEQUENCE]) + 1
                        yield msg
                    elif status == "204":  # end of batch
                        if found.get(headers.NUM_PENDING, "0") == "0":
                            return
                        break
                    elif status == "404":
                        return
                    else:
                        raise StoreUnavailableError(
                            operation=operation,
                            reason=f"direct get answered {status} "
                            f"{found.get(headers.DESCRIPTION, '')}",
                        )
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
