"""A circuit breaker's state changes as events in the store: `circuit.opened`,
`circuit.half_opened` and `circuit.closed` on the stream `circuit.<name>`.

`CircuitBreaker.on_change` is called synchronously inside a call; appending is async. The
recorder queues each change (bounded) and one owned task appends them in order, so a slow or
unavailable store never delays or breaks a guarded call: what it could not append is counted
and logged, not raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from typing import Final

from newfuse.errors import FuseError
from newfuse.eventstore import ANY, EventStore
from newfuse.reliability import CircuitBreaker
from newfuse.schemas import CIRCUIT_TYPES, NewEvent, check_token, utcnow

log = logging.getLogger(__name__)

QUEUE_LIMIT: Final = 1000
"""Changes waiting to be appended, at most; beyond that the newest are dropped (and counted):
a breaker flapping faster than the store takes events must not grow memory without bound."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def circuit_stream(name: str) -> str:
    """The stream of a breaker's events: `circuit.<name>` with every run of characters that
    cannot be in a stream id replaced by `-` (`model openai` -> `circuit.model-openai`); a name
    with none left, or too long, is its hash."""
    slug = _UNSAFE.sub("-", name).strip("-")[:64]
    try:
        return f"circuit.{check_token(slug, kind='circuit id')}"
    except FuseError:
        return f"circuit.{hashlib.sha256(name.encode()).hexdigest()[:32]}"


class CircuitEvents:
    """Appends the state changes of the breakers it watches to `store` (an async context
    manager: entering starts the appender, leaving appends what is queued, for at most
    `flush_timeout` seconds, then stops).

    Attributes:
        appended: events appended so far.
        dropped: changes lost (queue full, or the store refused them; each logged).
    """

    def __init__(self, store: EventStore, *, flush_timeout: float = 5.0) -> None:
        self.store = store
        self.appended = 0
        self.dropped = 0
        self._flush_timeout = flush_timeout
        self._queue: asyncio.Queue[tuple[str, NewEvent]] = asyncio.Queue(QUEUE_LIMIT)
        self._streams: dict[str, str] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CircuitEvents:
        if self._task is None:
            self._task = asyncio.create_task(self._append(), name="circuit events")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def watch(self, breaker: CircuitBreaker) -> CircuitBreaker:
        """Record `breaker`'s changes (sets its `on_change`); returns it."""
        self._breakers[breaker.name] = breaker
        breaker.on_change = self.on_change
        return breaker

    def on_change(self, name: str, old: str, new: str) -> None:
        """A `CircuitBreaker.on_change`: queue the event of a move from `old` to `new`."""
        if new not in CIRCUIT_TYPES or old not in CIRCUIT_TYPES:
            log.warning("circuit %r: unknown move %r -> %r, not recorded", name, old, new)
            self.dropped += 1
            return
        type_name, payload = CIRCUIT_TYPES[new]
        breaker = self._breakers.get(name)
        data = payload(
            circuit=name,
            previous=old,
            failures=breaker.failed if breaker is not None else 0,
            timestamp=utcnow(),
        )
        stream = self._streams.get(name) or self._streams.setdefault(name, circuit_stream(name))
        try:
            self._queue.put_nowait((stream, NewEvent(data=data, type=type_name)))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("circuit %r: %d changes queued; %s not recorded", name, QUEUE_LIMIT, new)

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a bounded wait
        """Wait until every change queued so far is appended (or dropped)."""
        async with asyncio.timeout(timeout):
            await self._queue.join()

    async def close(self) -> None:
        """Append what is queued (for at most `flush_timeout` seconds), then stop. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            with contextlib.suppress(TimeoutError):
                await self.flush(self._flush_timeout)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _append(self) -> None:
        while True:
            stream, event = await self._queue.get()
            try:
                try:
                    await self.store.append(stream, event, ANY)
                    self.appended += 1
                except FuseError as error:
                    self.dropped += 1
                    log.warning("%s: %s not recorded: %s", stream, event.type, error)
            finally:
                self._queue.task_done()
