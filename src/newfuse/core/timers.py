"""Timers: a wake-up at a given time, by key (a step's lease end, a retry's backoff, a lock or
review deadline), so a wait is a scheduled event and not a sleep.

`Timers.schedule(key, at, payload)` sets the timer `key` (setting it again replaces it),
`cancel(key)` removes it, and `start(on_fire)` hands every fire to `on_fire`. A fire is a
wake-up, not the truth: the receiver re-reads what it is about (the saga's stream) and decides
from that, so a fire for something that moved on is a no-op, and a fire handled twice is too.

Two implementations:
- `JetStreamTimers`: JetStream message scheduling (ADR-51, nats-server >= 2.12). A timer is one
  message on `<prefix>.timer.at.<namespace>.<key>` with `Nats-Schedule: @at <RFC 3339>`; the
  server stores its fire on `<prefix>.timer.fired.<namespace>.<key>` at that time, and removes
  the schedule. The stream (`<PREFIX>_TIMERS`) keeps one message per subject, so setting a key
  again replaces its schedule; cancelling purges the schedule's subject. Fires are read by one
  durable consumer per namespace that every instance shares (each fire goes to one of them, and
  to another if that one dies before acknowledging it). Timers survive the restart of whoever
  set them, and of the server. A timer may say how stale its fire may get (`stale_after`): a
  past `@at` fires at once, even after a month of downtime, so its schedule carries `Nats-TTL`
  (ADR-51's way to drop it) and its body the limit, which the receiver checks (after an
  outage, nats-server 2.15.1 drops a schedule whose TTL ran out meanwhile in some runs and
  fires it in others: its expiry races the scheduler at start).
- `MemoryTimers`: an in-process heap, for the SQLite store and servers without scheduling. Its
  timers die with the process; that is fine where every instance re-reads its state on start
  (a restarted orchestrator re-reads every saga) and the waiting instance sets its own timer.

`open_timers(store, namespace)` picks one for an event store.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from newfuse.errors import (
    ConsumerCreateError,
    FuseError,
    InvalidNameError,
    InvalidTimerError,
    NameTooLongError,
    TimerSetupError,
)
from newfuse.eventstore import EventStore
from newfuse.nats import headers
from newfuse.nats.durable import DurableSpec, PullLoop, ensure_durable
from newfuse.nats.jsapi import API, api_error, api_request
from newfuse.nats.jserrors import client_error, decode_pub_ack, refused_error
from newfuse.nats.provision import (
    TimerStreamSpec,
    ensure_event_stream,
    server_supports_schedules,
    server_version,
)
from newfuse.nats.subjects import Subjects
from newfuse.schemas import check_token

log = logging.getLogger("newfuse.timers")

MAX_TIMER_BYTES = 4096
"""The largest timer body (key, time and payload as JSON): a timer carries a wake-up, not data."""
MAX_KEY_BYTES = 512
"""The longest timer key (UTF-8 bytes), dots included."""
KEEP_FIRED = 3600.0
"""Seconds a fire stays in the JetStream stream (`Nats-Schedule-TTL`) for a consumer to read."""


class Fire(msgspec.Struct, frozen=True, kw_only=True):
    """A timer that fired: its key, the time it was set for, the payload it was set with, and
    how late it may come (seconds after `at`; None: however late)."""

    key: str
    at: datetime
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    stale_after: float | None = None


FireHandler = Callable[[Fire], Awaitable[None]]
_ENCODE = msgspec.json.Encoder()
_DECODE = msgspec.json.Decoder(Fire)


def timer_key(*tokens: str) -> str:
    """A key made of subject tokens, e.g. `timer_key(saga_id, step)` -> `<saga id>.<step>`.

    Raises:
        InvalidNameError: a token is empty or holds a dot, space, `*`, `>` or a control
            character; or the key is longer than MAX_KEY_BYTES.
    """
    return check_key(".".join(tokens))


def check_key(key: str) -> str:
    """`key` if it is one or more subject tokens joined by dots, at most MAX_KEY_BYTES.

    Raises:
        InvalidNameError: it is not.
    """
    if not isinstance(key, str):
        raise InvalidNameError(kind="timer key", name=repr(key), reason="it is not text")
    size = len(key.encode())
    if size > MAX_KEY_BYTES:
        raise NameTooLongError(
            kind="timer key", name=key, size=size, limit=MAX_KEY_BYTES, limit_name="MAX_KEY_BYTES"
        )
    for token in key.split("."):
        check_token(token, kind="timer key token")
    return key


def _encode(
    key: str, at: datetime, payload: Mapping[str, Any] | None, stale_after: float | None
) -> bytes:
    if at.tzinfo is None:
        raise InvalidTimerError(where=f"for key {key!r}", reason="its time has no time zone")
    try:
        fire = Fire(
            key=key, at=at.astimezone(UTC), payload=dict(payload or {}), stale_after=stale_after
        )
        body = _ENCODE.encode(fire)
    except (TypeError, ValueError, OverflowError) as error:
        raise InvalidTimerError(
            where=f"for key {key!r}", reason=f"its payload is not JSON: {error}"
        ) from None
    if len(body) > MAX_TIMER_BYTES:
        raise InvalidTimerError(
            where=f"for key {key!r}",
            reason=f"it is {len(body)} bytes as JSON, the limit is {MAX_TIMER_BYTES} "
            f"(MAX_TIMER_BYTES): carry an id, not the data",
        )
    return body


def decode_fire(body: bytes, *, key: str, where: str) -> Fire:
    """The fire in `body`, read from a subject of timer `key` (hostile input: bounded, checked).

    Raises:
        InvalidTimerError: too big, not a timer's JSON, or for another key.
    """
    if len(body) > MAX_TIMER_BYTES:
        raise InvalidTimerError(
            where=where, reason=f"{len(body)} bytes, the limit is {MAX_TIMER_BYTES}"
        )
    try:
        fire = _DECODE.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise InvalidTimerError(where=where, reason=f"not a timer's JSON: {error}") from None
    if fire.key != key:
        raise InvalidTimerError(
            where=where, reason=f"it names key {fire.key[:100]!r}, its subject {key!r}"
        )
    if fire.at.tzinfo is None:
        raise InvalidTimerError(where=where, reason="its time has no time zone")
    return fire


class Timers(ABC):
    """Timers of one namespace (e.g. `saga`): set, replace, cancel by key; fires go to the
    handler given to `start`. An async context manager; `close()` is idempotent.

    Every operation on one key runs in the order it was asked (`schedule_soon` and
    `cancel_soon` queue it and return at once; `schedule` and `cancel` wait for it), so a
    cancel asked before a schedule never lands after it.
    """

    backend: ClassVar[str]
    survives_restart: ClassVar[bool]
    """Whether a timer outlives the process that set it."""

    def __init__(self, namespace: str) -> None:
        self.namespace = check_token(namespace, kind="timer namespace")
        self.fired = 0
        """Fires handed to the handler."""
        self.dropped = 0
        """Fires that were not a timer's (logged and dropped)."""
        self.stale = 0
        """Fires that came later than their `stale_after` (dropped)."""
        self._handler: FireHandler | None = None
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    async def __aenter__(self) -> Timers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, on_fire: FireHandler) -> None:
        """Hand every fire of this namespace to `on_fire` from now on (once per instance).

        A handler that raises gets the fire again later (JetStream) or loses it (in-process);
        either way it is logged.
        """
        if self._handler is not None:
            raise RuntimeError(f"timers {self.namespace!r} were started already")
        self._handler = on_fire
        await self._start()

    async def schedule(
        self,
        key: str,
        at: datetime,
        payload: Mapping[str, Any] | None = None,
        *,
        stale_after: float | None = None,
    ) -> None:
        """Set timer `key` to fire at `at` (a past time fires at once), replacing what it was.

        Args:
            key: one or more subject tokens joined by dots (see `timer_key`).
            at: when, with a time zone.
            payload: JSON-encodable data handed back with the fire (small: MAX_TIMER_BYTES).
            stale_after: seconds after `at` past which the fire is dropped instead (the server
                or this process was down that long; a timer stale already when set is
                cancelled); None fires however late.

        Raises:
            InvalidNameError: a bad key. InvalidTimerError: a bad time or payload.
            StoreUnavailableError, PublishRejectedError: the server did not take it.
        """
        check_key(key)
        body = _encode(key, at, payload, stale_after)
        await self._in_order(key, self._set_or_drop(key, at, body, stale_after))

    async def cancel(self, key: str) -> None:
        """Remove timer `key` (nothing happens if it is not set, or fired already).

        Raises:
            InvalidNameError: a bad key. StoreUnavailableError: the server did not answer.
        """
        check_key(key)
        await self._in_order(key, self._cancel(key))

    def schedule_soon(
        self,
        key: str,
        at: datetime,
        payload: Mapping[str, Any] | None = None,
        *,
        stale_after: float | None = None,
    ) -> None:
        """`schedule` in the background, best effort (a failure is logged): for callers whose
        latency must not include the server's answer."""
        check_key(key)
        body = _encode(key, at, payload, stale_after)
        self._queue(key, self._set_or_drop(key, at, body, stale_after), "set")

    def cancel_soon(self, key: str) -> None:
        """`cancel` in the background, best effort (a failure is logged; the timer then fires
        and its receiver finds nothing to do)."""
        check_key(key)
        self._queue(key, self._cancel(key), "cancel")

    async def _set_or_drop(
        self, key: str, at: datetime, body: bytes, stale_after: float | None
    ) -> None:
        if stale_after is not None and datetime.now(UTC) - at > timedelta(seconds=stale_after):
            await self._cancel(key)  # stale already: set to nothing (a past time fires at once)
        else:
            await self._schedule(key, at, body, stale_after)

    async def _in_order(self, key: str, op: Coroutine[Any, Any, None]) -> None:
        before = self._chains.get(key)
        task = asyncio.create_task(self._after(before, op))
        self._chain(key, task)
        await asyncio.shield(task)

    def _queue(self, key: str, op: Coroutine[Any, Any, None], what: str) -> None:
        if self._closed:
            op.close()
            return
        task = asyncio.create_task(self._after(self._chains.get(key), op, key=key, what=what))
        self._chain(key, task)

    def _chain(self, key: str, task: asyncio.Task[None]) -> None:
        self._chains[key] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._chains.get(key) is finished:
                del self._chains[key]

        task.add_done_callback(done)

    async def _after(
        self,
        before: asyncio.Task[None] | None,
        op: Coroutine[Any, Any, None],
        *,
        key: str = "",
        what: str = "",
    ) -> None:
        if before is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(before)
        if not what:  # awaited by the caller: it sees the error
            await op
            return
        try:
            await op
        except FuseError as error:
            log.warning("timers %s: %s timer %r: %s", self.namespace, what, key, error)

    async def _deliver(self, fire: Fire) -> bool:
        """Hand `fire` to the handler (unless it is stale); False when it raised (logged)."""
        assert self._handler is not None
        late = (datetime.now(UTC) - fire.at).total_seconds()
        if fire.stale_after is not None and late > fire.stale_after:
            # nats-server 2.15.1 may fire a schedule whose Nats-TTL ran out while it was down
            self.stale += 1
            log.info(
                "timers %s: %r fired %.1fs late: stale, dropped", self.namespace, fire.key, late
            )
            return True
        try:
            await self._handler(fire)
        except Exception:
            log.exception("timers %s: handling the fire of %r", self.namespace, fire.key)
            return False
        self.fired += 1
        return True

    def _drop(self, error: InvalidTimerError) -> None:
        self.dropped += 1
        log.warning("timers %s: %s", self.namespace, error)

    async def close(self) -> None:
        """Stop delivering fires; let queued operations finish for a moment (then cancel
        them: best effort). Set timers stay set where they survive restarts. Idempotent."""
        self._closed = True
        pending = set(self._chains.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=2.0)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._chains.clear()
        await self._close()

    @abstractmethod
    async def _start(self) -> None: ...

    @abstractmethod
    async def _schedule(
        self, key: str, at: datetime, body: bytes, stale_after: float | None
    ) -> None: ...

    @abstractmethod
    async def _cancel(self, key: str) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...


class Alarm:
    """One waiter's timer on `timers` (say, one saga's driver): setting the key and time it set
    last again costs nothing. `set` says "new" when it set the timer, "same" when it was set
    already (a waiter woken early, by something else, sleeps out the rest itself), "failed"
    when the server did not take it (logged; the waiter then sleeps until the time itself)."""

    def __init__(self, timers: Timers, *, stale_after: float | None = None) -> None:
        self.timers = timers
        self.stale_after = stale_after
        self._last: tuple[str, datetime] | None = None

    async def set(self, key: str, at: datetime) -> Literal["new", "same", "failed"]:
        """Set timer `key` to `at` unless this alarm set just that last."""
        if self._last == (key, at):
            return "same"
        try:
            await self.timers.schedule(key, at, stale_after=self.stale_after)
        except FuseError as error:
            self._last = None
            log.warning("timers %s: set %r: %s", self.timers.namespace, key, error)
            return "failed"
        self._last = (key, at)
        return "new"

    def forget(self) -> None:
        """Something else set or cancelled the timer: the next `set` sets it."""
        self._last = None


class MemoryTimers(Timers):
    """Timers in this process (a heap and one task): they die with it. For the SQLite store and
    servers without message scheduling; each fire goes to this instance's handler only."""

    backend = "memory"
    survives_restart = False

    def __init__(self, namespace: str = "saga") -> None:
        super().__init__(namespace)
        self._set: dict[str, tuple[int, bytes]] = {}
        self._heap: list[tuple[datetime, int, str]] = []
        self._counter = itertools.count()
        self._changed = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name=f"newfuse-timers-{self.namespace}")

    async def _schedule(
        self, key: str, at: datetime, body: bytes, stale_after: float | None
    ) -> None:
        number = next(self._counter)
        self._set[key] = (number, body)
        heapq.heappush(self._heap, (at, number, key))
        self._changed.set()

    async def _cancel(self, key: str) -> None:
        self._set.pop(key, None)  # its heap entry is skipped when it comes up

    async def _run(self) -> None:
        while True:
            now = datetime.now(UTC)
            while self._heap and self._heap[0][0] <= now:
                _, number, key = heapq.heappop(self._heap)
                entry = self._set.get(key)
                if entry is None or entry[0] != number:
                    continue  # cancelled or replaced
                del self._set[key]
                await self._deliver(_DECODE.decode(entry[1]))
            self._changed.clear()
            pause = (self._heap[0][0] - now).total_seconds() if self._heap else 3600.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, pause)):
                    await self._changed.wait()

    async def _close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None


class JetStreamTimers(Timers):
    """Timers as JetStream message schedules (ADR-51, nats-server >= 2.12): see the module's
    docstring. The stream is provisioned on first use, like the others (`replicas` None
    chooses by the servers); the durable consumer `<namespace>-timers` is shared by every
    instance of the namespace.

    Args:
        nc: a connected client (not closed by the timers).
        prefix: the subject prefix (the store's).
        namespace: whose timers these are (a subject token): each namespace has its consumer.
        replicas: copies of the stream when this creates it.
        ack_wait: seconds before a fire given to an instance that did not acknowledge it (it
            died) goes to another.
        keep_fired: seconds a fire stays in the stream for a consumer to read.
        timeout: seconds for each server answer.
    """

    backend = "jetstream"
    survives_restart = True

    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = "fuse",
        namespace: str = "saga",
        replicas: int | None = None,
        ack_wait: float = 5.0,
        keep_fired: float = KEEP_FIRED,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(namespace)
        self.nc = nc
        self.subjects = Subjects(prefix)
        self.stream_name = self.subjects.timer_stream_name
        self.durable = f"{self.namespace}-timers"
        self._spec = TimerStreamSpec(subjects=self.subjects, replicas=replicas)
        self._ack_wait = ack_wait
        self._keep_fired = max(1, math.ceil(keep_fired))
        self._timeout = timeout
        self._fired_prefix = self.subjects.timer_fired(self.namespace, "")
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._pull: PullLoop | None = None
        self._reader: asyncio.Task[None] | None = None

    async def ensure_stream(self) -> None:
        """Provision the timers' stream (idempotent).

        Raises:
            TimerSetupError: the server has no message scheduling.
            StreamConfigError, StreamCreateError, StoreUnavailableError: as for the events.
        """
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            version = server_version(self.nc)
            if not server_supports_schedules(version):
                raise TimerSetupError(
                    stream=self.stream_name,
                    reason=f"nats-server {version or '(version unknown)'} has no message "
                    f"scheduling (2.12 or newer has)",
                )
            await ensure_event_stream(self.nc, self._spec, timeout=self._timeout)
            self._ready = True

    async def _start(self) -> None:
        await self.ensure_stream()
        spec = DurableSpec(
            stream=self.stream_name,
            name=self.durable,
            filter_subjects=(self.subjects.timer_fired(self.namespace),),
            ack_wait=self._ack_wait,
            max_ack_pending=1000,
        )
        try:
            await ensure_durable(self.nc, spec, timeout=self._timeout)
        except ConsumerCreateError as error:
            raise TimerSetupError(stream=self.stream_name, reason=error.description) from None
        self._pull = PullLoop(self.nc, self.stream_name, self.durable, batch=64)
        await self._pull.start()
        self._reader = asyncio.create_task(
            self._read(self._pull), name=f"newfuse-timers-{self.namespace}"
        )

    async def _schedule(
        self, key: str, at: datetime, body: bytes, stale_after: float | None
    ) -> None:
        await self.ensure_stream()
        subject = self.subjects.timer_schedule(self.namespace, key)
        sent = {
            headers.SCHEDULE: f"@at {at.astimezone(UTC).isoformat().replace('+00:00', 'Z')}",
            headers.SCHEDULE_TARGET: self._fired_prefix + key,
            headers.SCHEDULE_TTL: f"{self._keep_fired}s",
        }
        if stale_after is not None:
            # the schedule expires that long after its time, by ADR-51 unfired; 2.15.1 may
            # fire it after a restart all the same, so the receiver checks its lateness too
            left = (at - datetime.now(UTC)).total_seconds() + stale_after
            sent[headers.TTL] = f"{max(1, math.ceil(left))}s"
        try:
            answer = await self.nc.request(subject, body, timeout=self._timeout, headers=sent)
        except Exception as error:  # nats-py's own errors: timeout, no responders, closed
            if isinstance(error, asyncio.CancelledError):
                raise
            raise client_error(f"set timer {key!r}", error) from None
        decode_pub_ack(answer.data, subject=subject)

    async def _cancel(self, key: str) -> None:
        await self.ensure_stream()
        operation = f"cancel timer {key!r}"
        answer = await api_request(
            self.nc,
            f"{API}.STREAM.PURGE.{self.stream_name}",
            {"filter": self.subjects.timer_schedule(self.namespace, key)},
            timeout=self._timeout,
            operation=operation,
        )
        error = api_error(answer)
        if error is not None:
            raise refused_error(operation, error)

    async def _read(self, pull: PullLoop) -> None:
        while True:
            msg = await pull.next()
            await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        """One delivered fire: checked (hostile input), handed over, acknowledged; a bad one is
        logged and terminated (never redelivered); a handler that raised gets it again."""
        key = msg.subject[len(self._fired_prefix) :]
        where = f"on {msg.subject[:200]!r}"
        try:
            try:
                check_key(key)
            except FuseError as error:
                raise InvalidTimerError(where=where, reason=str(error)) from None
            scheduler = (msg.headers or {}).get(headers.SCHEDULER)
            if scheduler != self.subjects.timer_schedule(self.namespace, key):
                raise InvalidTimerError(
                    where=where,
                    reason=f"not fired by its schedule ({headers.SCHEDULER} is "
                    f"{str(scheduler)[:200]!r})",
                )
            fire = decode_fire(msg.data, key=key, where=where)
        except InvalidTimerError as error:
            self._drop(error)
            with contextlib.suppress(Exception):
                await msg.term()
            return
        if await self._deliver(fire):
            with contextlib.suppress(Exception):
                await msg.ack()
        else:
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)

    async def _close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._pull is not None:
            await self._pull.close()
            self._pull = None


async def open_timers(
    store: EventStore,
    namespace: str = "saga",
    **options: Any,
) -> Timers:
    """The timers that fit `store`: JetStream message schedules when it is a JetStream store on
    a server that has them (2.12 or newer), in-process ones otherwise (the SQLite store, an
    older server). `options` go to JetStreamTimers (ack_wait, keep_fired, timeout)."""
    from newfuse.eventstore.jetstream import JetStreamEventStore  # the NATS backend, lazily

    if isinstance(store, JetStreamEventStore):
        await store.ensure_stream()  # its replica count is the timers' too
        if server_supports_schedules(server_version(store.nc)):
            return JetStreamTimers(
                store.nc,
                prefix=store.subjects.prefix,
                namespace=namespace,
                replicas=store.replicas or None,
                **options,
            )
        log.warning(
            "nats-server %s has no message scheduling (2.12+): timers of %r are in-process "
            "(they do not survive a restart; every instance sets its own)",
            server_version(store.nc) or "(version unknown)",
            namespace,
        )
    return MemoryTimers(namespace)
