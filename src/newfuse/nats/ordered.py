"""An ordered push consumer on the raw nats-py client: every message once, in order, across gaps.

The consumer is ephemeral (memory storage, no acks, flow control, idle heartbeats). A gap in its
delivery sequence, a heartbeat naming another last delivery, a status message, the client's
reconnect, a heartbeat late by a quarter interval when `CONSUMER.INFO` then gets no answer
within half an interval (its server died: nothing tells a client that), or three silent
heartbeat intervals make it recreate the consumer from the last sequence handed out + 1;
anything at or below that sequence is dropped, so there are no duplicates either. The consumer
has one replica: an R3 ephemeral consumer whose leader dies is silent until its group elects
another (4.8 s measured on nats-server 2.15), while an R1 one is recreated on a live server in
under 2 s. A delivered
message's reply subject holds its metadata (ADR-15): `$JS.ACK.<stream>.<consumer>.<delivered>.
<stream seq>.<consumer seq>.<timestamp>.<pending>`, or with `<domain>.<account hash>` after
`$JS.ACK` and a random token at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Final, NamedTuple

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from newfuse.errors import FuseError, ReadInterruptedError, StoreClosedError, StoreUnavailableError
from newfuse.nats import headers
from newfuse.nats.connection import on_reconnect
from newfuse.nats.election import FIRST_ATTEMPT_WAIT
from newfuse.nats.jsapi import (
    api_error,
    consumer_create,
    consumer_delete,
    consumer_info,
    nanoseconds,
)
from newfuse.nats.jserrors import client_error, refused_error
from newfuse.schemas import as_utc

log = logging.getLogger("newfuse.nats")

_INACTIVE_THRESHOLD: Final = 60.0
"""Seconds after which the server deletes a consumer nobody listens to (a client that died)."""
_HEDGE: Final = 0.25
"""Seconds a recreating feed waits for a consumer create's answer before it sends another."""
_HEDGES: Final = 4
"""Consumer creates a recreating feed has in flight at most."""


class FeedMessage(NamedTuple):
    """One stored message as the consumer delivers it."""

    sequence: int
    """Its stream sequence."""
    time_ns: int
    """When the server stored it, in nanoseconds since the Unix epoch."""
    pending: int
    """How many messages matching the filters follow it in the stream (when it was sent)."""
    subject: str
    data: bytes
    headers: dict[str, str] | None = None
    """Its stored headers (the signature's among them: `newfuse.nats.signing`)."""


class _Created(NamedTuple):
    """A consumer create the server answered: its candidate's generation, inbox, answer."""

    generation: int
    sub: Subscription
    answer: dict[str, Any]


async def _unsubscribe(sub: Subscription) -> None:
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


class _FlowControl(NamedTuple):
    """A flow-control request, answered once everything queued before it is consumed."""

    reply: str


class _Signal:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_RESET: Final = _Signal("reset")
"""Recreate the consumer from the last sequence handed out."""
_BEAT: Final = _Signal("heartbeat")
"""The consumer is alive and has sent everything."""
_CLOSED: Final = _Signal("closed")
"""Wakes a reader waiting on the queue after `close`."""

_Item = FeedMessage | _FlowControl | _Signal


class OrderedPushConsumer:
    """Every message of the `filters` subjects of `stream`, once and in order, from sequence
    `start` (or from time `since`), across gaps, reconnects and server restarts.

    How long it tries to recreate a lost consumer: with `patience` None (a live feed) until the
    server is back; otherwise `patience` seconds from the failure, then the iteration raises
    ReadInterruptedError naming the last sequence delivered (`operation` says what was read).
    After `close` (or `close_nowait`) the iteration raises StoreClosedError naming `owner`.

    Call `start` (fails at once) or `recreate` (waits for the server) first, then iterate over
    the FeedMessages; `close` deletes the consumer.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        filters: list[str],
        start: int,
        *,
        since: datetime | None = None,
        heartbeat: float,
        timeout: float,
        patience: float | None,
        owner: str,
        operation: str = "",
        description: str | None = None,
    ) -> None:
        self._nc = nc
        self._description = description
        self._stream = stream
        self._filters = filters
        self._last = start - 1
        self._since = since
        self._heartbeat = heartbeat
        self._timeout = timeout
        self._patience = patience
        self._owner = owner
        self._operation = operation or f"read {', '.join(filters)}"
        self._failing_since: float | None = None
        self._stop = asyncio.Event()
        self._attempt: asyncio.Timeout | None = None  # the deadline of a consumer create
        self._delivered_any = False
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._generation = 0  # whose messages are taken: those of the consumer in use
        self._generations = 0  # how many were handed out (each consumer, each reset its own)
        self._expected_cseq = 1
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._closed = False
        self._reset_pending = False
        self._flow_waiting: set[str] = set()
        self._unlisten: Callable[[], None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()  # deleting the consumers of lost races

    async def start(self) -> int:
        """Create the consumer; returns how many messages it has pending.

        Raises:
            StoreUnavailableError: the server did not answer or refused.
            StoreClosedError: closed meanwhile.
        """
        return await self._create(self._timeout)

    async def _create(self, wait: float, *, hedge: float | None = None) -> int:
        """Create the consumer afresh, waiting `wait` seconds for the server's answer.

        With `hedge`, a create still unanswered after `hedge` seconds is sent again (at most
        `_HEDGES` in all) and the first answer wins: the meta leader places an R1 consumer on a
        random peer of the stream and may pick one that just died and whose death it has not
        noticed yet; such a create is never answered, while one placed on a live peer is
        answered in milliseconds. The losers' consumers are deleted once they answer.
        """
        if self._unlisten is None and not self._closed:
            # a reconnect may have lost the consumer with its server: recreate it at once
            self._unlisten = on_reconnect(self._nc, self._reset)
        await self._drop_consumer()
        hold = self._generation = self._new_generation()  # no candidate's: theirs wait in `held`
        self._expected_cseq = 1
        self._flow_waiting.clear()
        held: dict[int, list[Msg]] = {}
        attempts: list[asyncio.Task[_Created]] = []
        try:
            winner = await self._first_created(wait, hedge, held, attempts)
        finally:
            # the losers: their consumers go once they answer (the server would drop an
            # unheard one after its inactive threshold anyway)
            for attempt in attempts:
                cleanup = asyncio.create_task(self._discard(attempt))
                self._cleanups.add(cleanup)
                cleanup.add_done_callback(self._cleanups.discard)
        refused = api_error(winner.answer)
        if refused is not None:
            await _unsubscribe(winner.sub)
            raise refused_error("create consumer", refused)
        if self._closed:  # closed while the server created it: delete it again
            self._sub, self._consumer = winner.sub, winner.answer["name"]
            await self._drop_consumer()
            raise self._closed_error()
        self._sub, self._consumer = winner.sub, winner.answer["name"]
        # what it delivered before its answer came, in order; then it is delivered directly
        queue = held[winner.generation]
        while queue and self._generation == hold:
            await self._on_message(queue.pop(0))
        if self._generation == hold:  # no reset meanwhile
            self._generation = winner.generation
        del held[winner.generation]
        pending: int = winner.answer.get("num_pending", 0)
        return pending

    async def _first_created(
        self,
        wait: float,
        hedge: float | None,
        held: dict[int, list[Msg]],
        attempts: list[asyncio.Task[_Created]],
    ) -> _Created:
        """The first create the server answers. Each waits `wait` seconds; with `hedge`, one
        more is sent each `hedge` seconds none was answered (at most `_HEDGES`). A create that
        fails (rather than waits) is raised once no other is still waiting."""
        most = 1 if hedge is None else _HEDGES
        failure: BaseException | None = None
        while True:
            waiting = [attempt for attempt in attempts if not attempt.done()]
            if not waiting:
                if failure is not None:
                    raise failure
                generation = self._new_generation()
                waiting.append(asyncio.create_task(self._create_one(generation, wait, held)))
                attempts.extend(waiting)
            done, _ = await asyncio.wait(
                waiting,
                timeout=hedge if len(attempts) < most else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:  # none answered within `hedge`: ask once more beside them
                generation = self._new_generation()
                attempts.append(asyncio.create_task(self._create_one(generation, wait, held)))
                continue
            for attempt in done:
                if attempt.cancelled():
                    continue
                error = attempt.exception()
                if error is None:
                    attempts.remove(attempt)
                    return attempt.result()
                failure = error
            if failure is not None and all(attempt.done() for attempt in attempts):
                raise failure

    async def _create_one(
        self, generation: int, wait: float, held: dict[int, list[Msg]]
    ) -> _Created:
        """Subscribe a fresh inbox and ask for a consumer delivering to it."""
        held[generation] = []
        inbox = self._nc.new_inbox()

        async def on_message(msg: Msg) -> None:
            if generation == self._generation:
                await self._on_message(msg)
            else:
                queue = held.get(generation)
                if queue is not None:  # not decided yet: kept for the winner
                    queue.append(msg)

        try:
            sub = await self._nc.subscribe(inbox, cb=on_message)
        except NatsError as error:
            raise client_error("create consumer", error) from None
        try:
            if self._closed:  # closed while subscribing: leave nothing behind
                raise self._closed_error()
            answer = await consumer_create(
                self._nc,
                self._stream,
                self._config(inbox),
                timeout=wait,
                operation="create consumer",
            )
        except BaseException:
            await _unsubscribe(sub)
            raise
        return _Created(generation, sub, answer)

    async def _discard(self, attempt: asyncio.Task[_Created]) -> None:
        """A losing create: when it answers, unsubscribe its inbox and delete its consumer."""
        try:
            created = await attempt
        except BaseException:
            return
        await _unsubscribe(created.sub)
        name = created.answer.get("name")
        if isinstance(name, str) and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await consumer_delete(
                    self._nc, self._stream, name, timeout=1.0, operation="delete consumer"
                )

    def _new_generation(self) -> int:
        self._generations += 1
        return self._generations

    def _config(self, inbox: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "deliver_subject": inbox,
            "ack_policy": "none",
            "max_deliver": 1,
            "flow_control": True,
            "idle_heartbeat": nanoseconds(self._heartbeat),
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": nanoseconds(_INACTIVE_THRESHOLD),
            "replay_policy": "instant",
        }
        if self._description is not None:  # who reads: status tools find the consumer by it
            config["description"] = self._description
        if self._since is not None and not self._delivered_any:
            config["deliver_policy"] = "by_start_time"
            config["opt_start_time"] = as_utc(self._since).isoformat()
        else:
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = self._last + 1
        if len(self._filters) == 1:
            config["filter_subject"] = self._filters[0]
        else:
            config["filter_subjects"] = self._filters
        return config

    def _closed_error(self) -> StoreClosedError:
        return StoreClosedError(store=self._owner)

    async def recreate(self) -> None:
        """Recreate the consumer from the last sequence handed out, until the server answers
        (live) or until `patience` seconds after the failure began (finite).

        Raises:
            ReadInterruptedError: a finite feed's patience ran out.
            StoreClosedError: the feed was closed.
        """
        loop = asyncio.get_running_loop()
        if self._failing_since is None:
            self._failing_since = loop.time()
        patience = self._patience
        deadline = None if patience is None else self._failing_since + patience
        wait = 0.05
        # The meta leader may place the new consumer on a server that just died and not yet
        # noticed: such a create is never answered, so attempts wait briefly, then longer.
        answer_wait = min(self._timeout, FIRST_ATTEMPT_WAIT)
        reason = "the server did not answer"
        while True:
            if self._closed:
                raise self._closed_error()
            remaining = None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ReadInterruptedError(
                        operation=self._operation,
                        position=self._last,
                        timeout=patience or 0.0,
                        reason=reason,
                    )
            try:
                async with asyncio.timeout(remaining) as self._attempt:  # one deadline in all
                    await self._create(answer_wait, hedge=_HEDGE)
                if self._delivered_any:
                    log.info(
                        "feed on %s: consumer recreated from %d, %.2fs after it was lost",
                        ", ".join(self._filters),
                        self._last + 1,
                        loop.time() - self._failing_since,
                    )
                return
            except StoreClosedError:
                raise
            except StoreUnavailableError as error:
                reason = error.reason
                log.debug("recreating consumer on %s: %s", self._filters, error)
            except FuseError as error:
                if not error.retryable:  # the next attempt would meet it again
                    raise
                reason = str(error)
            except Exception as error:  # timeout, connection closed or reconnecting: again
                reason = f"the server did not answer ({type(error).__name__})"
                log.debug("recreating consumer on %s: %r", self._filters, error)
            finally:
                self._attempt = None
            pause = wait if deadline is None else max(0.0, min(wait, deadline - loop.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stop.wait()  # set by close_nowait(): stop waiting at once
            wait = min(wait * 2, 1.0)
            answer_wait = min(answer_wait * 2, self._timeout, 2 * FIRST_ATTEMPT_WAIT)

    async def _on_message(self, msg: Msg) -> None:
        found = msg.headers
        if found is not None and headers.STATUS in found:
            if found[headers.STATUS] == "100":
                if msg.reply:  # flow control: answer once everything before it is consumed
                    self._flow_waiting.add(msg.reply)
                    self._queue.put_nowait(_FlowControl(msg.reply))
                    return
                stalled = found.get(headers.CONSUMER_STALLED)
                # Answer a stalled consumer only if its flow-control request is not still
                # queued behind undelivered messages (then the reader is just slow: let it).
                if stalled and stalled not in self._flow_waiting:
                    with contextlib.suppress(Exception):
                        await self._nc.publish(stalled, b"")
                last = found.get(headers.LAST_CONSUMER)
                if last is not None and int(last) != self._expected_cseq - 1:
                    self._reset()
                else:
                    self._queue.put_nowait(_BEAT)
                return
            self._reset()  # 409 consumer deleted, leadership change, ...
            return
        tokens = msg.reply.split(".")  # the metadata (ADR-15), see the module docstring
        if len(tokens) == 9:
            sseq, cseq, stamp, pending = tokens[5], tokens[6], tokens[7], tokens[8]
        else:
            sseq, cseq, stamp, pending = tokens[7], tokens[8], tokens[9], tokens[10]
        if int(cseq) != self._expected_cseq:
            self._reset()
            return
        self._expected_cseq += 1
        self._queue.put_nowait(
            FeedMessage(int(sseq), int(stamp), int(pending), msg.subject, msg.data, found)
        )

    def _reset(self) -> None:
        self._generation = self._new_generation()  # whatever the old consumer sends is dropped
        if not self._reset_pending:
            self._reset_pending = True
            self._queue.put_nowait(_RESET)

    def __aiter__(self) -> AsyncIterator[FeedMessage]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[FeedMessage]:
        queue = self._queue
        late = 1.25 * self._heartbeat
        stall = 3 * self._heartbeat
        while True:
            if self._closed:
                raise self._closed_error()
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                item = await self._next_or_reset(late, stall)
            if type(item) is FeedMessage:
                if item.sequence <= self._last:
                    continue
                self._last = item.sequence
                self._delivered_any = True
                self._failing_since = None
                yield item
            elif type(item) is _FlowControl:
                with contextlib.suppress(Exception):
                    await self._nc.publish(item.reply, b"")
                self._flow_waiting.discard(item.reply)
            elif item is _RESET:
                self._reset_pending = False
                await self.recreate()
            elif item is _BEAT:
                self._failing_since = None

    async def _next_or_reset(self, late: float, stall: float) -> _Item:
        """The next queued item; _RESET when the heartbeat is late and the consumer is gone,
        or when three heartbeats were missed."""
        queue = self._queue
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(late):
                return await queue.get()
        if await self._consumer_gone():
            log.debug("feed on %s: heartbeat late and its consumer gone", self._filters)
            return _RESET
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(stall - late):
                return await queue.get()
        return _RESET

    async def _consumer_gone(self) -> bool:
        """True unless the server says the consumer exists (asked with a short deadline)."""
        consumer = self._consumer
        if consumer is None:
            return True
        try:
            answer = await consumer_info(
                self._nc,
                self._stream,
                consumer,
                # a live consumer's server answers in milliseconds; a dead one never does
                timeout=min(self._timeout, self._heartbeat / 2),
                operation="consumer info",
            )
        except StoreUnavailableError:
            return True
        return api_error(answer) is not None

    async def _drop_consumer(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await _unsubscribe(sub)
        consumer, self._consumer = self._consumer, None
        if consumer is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await consumer_delete(
                    # short: the consumer's server may be the one that died (and the server
                    # removes an unheard consumer after its inactive threshold anyway)
                    self._nc,
                    self._stream,
                    consumer,
                    timeout=min(1.0, self._heartbeat / 2),
                    operation="delete consumer",
                )

    def close_nowait(self) -> None:
        """Mark the feed closed and wake its reader (it raises StoreClosedError), without
        waiting for anything; `close` also deletes the consumer. Idempotent."""
        if not self._closed:
            self._closed = True
            self._generation = self._new_generation()
            if self._unlisten is not None:
                self._unlisten()
                self._unlisten = None
            self._stop.set()
            self._queue.put_nowait(_CLOSED)
            attempt = self._attempt
            if attempt is not None and not attempt.expired():
                attempt.reschedule(-1.0)  # a create waiting on a dead server: give it up now

    async def close(self) -> None:
        """Shut the feed and delete its consumer. Idempotent."""
        self.close_nowait()
        await self._drop_consumer()
        cleanups = list(self._cleanups)
        if cleanups:  # deletes of consumers that lost a race, bounded by their answer wait
            await asyncio.wait(cleanups, timeout=1.0)
            for cleanup in cleanups:
                cleanup.cancel()
