"""Durable pull consumers (ADR-37 style): create-or-update, a refilling pull loop, explicit acks.

The loop keeps pull requests outstanding on one private inbox: a request asks for `batch`
messages and lives `expires` seconds with idle heartbeats; a new one is sent when fewer than
half a batch remain asked for. A 408/409 status says how many of a request went undelivered
(`Nats-Pending-Messages`); when neither a message nor a heartbeat came for two heartbeat
intervals (a server restart drops pull requests), everything is asked for again.
Instances that bind the same durable name share its messages (competing consumers).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from newfuse.errors import ConsumerCreateError
from newfuse.nats import headers
from newfuse.nats.connection import reads_own_subjects_only
from newfuse.nats.jsapi import API, api_error, api_request, nanoseconds


class DurableSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A durable pull consumer's configuration.

    Attributes:
        stream: the JetStream stream.
        name: the durable name (no `.`, `*`, `>`, `/`, `\\` or whitespace).
        filter_subjects: the subjects it delivers (one or more).
        ack_wait: seconds before an unacknowledged delivery is redelivered.
        max_deliver: deliveries before the server stops redelivering (-1: no limit).
        max_ack_pending: deliveries in flight at most, over every instance.
    """

    stream: str
    name: str
    filter_subjects: tuple[str, ...]
    ack_wait: float = 30.0
    max_deliver: int = -1
    max_ack_pending: int = 1000

    def config(self) -> dict[str, Any]:
        """The JetStream API consumer configuration."""
        config: dict[str, Any] = {
            "durable_name": self.name,
            "ack_policy": "explicit",
            "deliver_policy": "all",
            "replay_policy": "instant",
            "ack_wait": nanoseconds(self.ack_wait),
            "max_deliver": self.max_deliver,
            "max_ack_pending": self.max_ack_pending,
        }
        if len(self.filter_subjects) == 1:
            config["filter_subject"] = self.filter_subjects[0]
        else:
            config["filter_subjects"] = list(self.filter_subjects)
        return config


async def ensure_durable(
    nc: Client,
    spec: DurableSpec,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline for the API answer
) -> None:
    """Create the durable consumer, or update it to `spec` (idempotent).

    An identity that may not create consumers (an agent's: `fuse auth`) uses the one that
    exists, which an admin or service made for it (`fuse dev --secure` does).

    Raises:
        ConsumerCreateError: JetStream refused the configuration (it says why).
        StoreUnavailableError: JetStream did not answer.
        PermissionDeniedError: this identity may not create it, and it does not exist.
    """
    if reads_own_subjects_only(nc):  # it may not create consumers: use the one there is
        info = await api_request(
            nc,
            f"{API}.CONSUMER.INFO.{spec.stream}.{spec.name}",
            timeout=timeout,
            operation=f"look up consumer {spec.name!r} on {spec.stream!r}",
        )
        if api_error(info) is None:
            return
    answer = await api_request(
        nc,
        f"{API}.CONSUMER.CREATE.{spec.stream}.{spec.name}",
        {"stream_name": spec.stream, "config": spec.config(), "action": ""},
        timeout=timeout,
        operation=f"create consumer {spec.name!r} on {spec.stream!r}",
    )
    error = api_error(answer)
    if error is not None:
        raise ConsumerCreateError(
            stream=spec.stream,
            consumer=spec.name,
            code=error.code,
            err_code=error.err_code,
            description=error.description,
        )


class PullLoop:
    """Pulls a durable consumer's messages into a queue (which several loops may share: each
    message's `metadata.consumer` says whose it is); `next()` hands them out.

    Acknowledging is the caller's (`msg.ack()`, `nak(delay)`, `term()`, `in_progress()`).
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        name: str,
        *,
        batch: int = 64,
        expires: float = 5.0,
        heartbeat: float = 1.0,
        queue: asyncio.Queue[Msg] | None = None,
    ) -> None:
        self._nc = nc
        self._next_subject = f"{API}.CONSUMER.MSG.NEXT.{stream}.{name}"
        self._batch = batch
        self._expires = expires
        self._heartbeat = heartbeat
        self._queue: asyncio.Queue[Msg] = asyncio.Queue() if queue is None else queue
        self._asked = 0  # messages asked for and not yet delivered or given up
        self._seen = asyncio.Event()
        self._inbox = ""
        self._sub: Subscription | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the private inbox and ask for the first batch."""
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        await self._ask()
        self._watch = asyncio.create_task(self._watchdog(), name=f"newfuse-pull-{self._inbox}")

    async def _ask(self) -> None:
        request = {
            "batch": self._batch,
            "expires": nanoseconds(self._expires),
            "idle_heartbeat": nanoseconds(self._heartbeat),
        }
        self._asked += self._batch
        await self._nc.publish(self._next_subject, msgspec.json.encode(request), reply=self._inbox)

    async def _on_msg(self, msg: Msg) -> None:
        self._seen.set()
        status = msg.headers.get(headers.STATUS) if msg.headers else None
        if status is None:
            self._asked -= 1
            self._queue.put_nowait(msg)
        elif status in ("408", "409"):  # the request expired or was refused: forget what's left
            left = msg.headers.get(headers.PENDING_MESSAGES) if msg.headers else None
            self._asked -= int(left) if left and left.isdigit() else self._batch
            self._asked = max(self._asked, 0)
        # status 100 is an idle heartbeat: seeing it is all that matters
        if self._asked < self._batch // 2 and self._queue.qsize() < self._batch:
            await self._ask()

    async def _watchdog(self) -> None:
        while True:
            self._seen.clear()
            try:
                async with asyncio.timeout(self._heartbeat * 2 + 0.5):
                    await self._seen.wait()
                continue
            except TimeoutError:
                pass
            if self._nc.is_connected:  # nothing came: the server lost our requests
                self._asked = 0
                with contextlib.suppress(Exception):
                    await self._ask()

    async def next(self) -> Msg:
        """The next delivered message (waits until one comes)."""
        msg = await self._queue.get()
        await self.taken()
        return msg

    async def taken(self) -> None:
        """A message left the queue (`next` says so itself; a shared queue's reader must):
        ask for more when fewer than half a batch remain asked for."""
        if self._asked < self._batch // 2 and self._queue.qsize() < self._batch:
            await self._ask()

    async def close(self) -> None:
        """Stop asking and unsubscribe; undelivered messages are redelivered after ack_wait."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
