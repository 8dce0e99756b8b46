"""The projection declaration and the ReadModel contract its targets (Redis, SQLite) honour.

A projection is a name, handlers per event type and a policy for poison events. A read model
stores any number of projections, each in generations: the model of generation `g` is kept apart
(Redis key prefix, SQLite tables), an "active generation" pointer says which one readers see, and
each generation has its own checkpoint, written in the same atomic unit as the model's change.
"""

from __future__ import annotations

import abc
import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import msgspec

from newfuse._closing import AsyncClosing
from newfuse.errors import InvalidNameError
from newfuse.eventstore import EventFilter
from newfuse.reliability import backoff
from newfuse.schemas import RecordedEvent

OnPoison = Literal["skip", "stop"]
"""What a projection does with an event whose handler keeps failing: dead-letter it and go on
(`skip`), or dead-letter it and stop at the checkpoint before it (`stop`)."""

ANY_TYPE = "*"
"""Handler key matching every event type that has no handler of its own."""

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How often and how patiently a failing handler is tried again.

    Attributes:
        attempts: tries in all (the first included) before the event is a dead letter.
        initial_delay: seconds before the second try.
        multiplier: each further delay is the previous one times this.
        max_delay: the longest delay.
    """

    attempts: int = 3
    initial_delay: float = 0.02
    multiplier: float = 2.0
    max_delay: float = 1.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` failed tries (>= 1)."""
        return backoff(
            failures, first=self.initial_delay, most=self.max_delay, multiplier=self.multiplier
        )


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An event a projection could not apply: where it is and what its handler raised."""

    projection: str
    position: int
    event_id: str
    event_type: str
    stream: str
    error: str
    attempts: int
    recorded_at: datetime


class RunnerStats(msgspec.Struct, frozen=True, kw_only=True):
    """What a runner last reported about itself (kept in the read model, for `status`).

    Attributes:
        state: `running`, `waiting` (its read model or store is unavailable), `stopped`
            (on purpose), or `failed` (a poison event stopped it).
        events_per_second: events applied per second over the last reporting interval.
        last_error: the last error met, if any.
        updated_at: when this was reported.
    """

    state: str
    events_per_second: float = 0.0
    last_error: str | None = None
    updated_at: datetime


class Batch:
    """One atomic unit of work on a read model: the handlers' changes plus the checkpoint."""

    def __init__(self, *, projection: str, generation: int) -> None:
        self.projection = projection
        self.generation = generation
        self.advanced_to: int | None = None
        self.dead: list[DeadLetter] = []

    def advance(self, position: int) -> None:
        """Set the checkpoint this batch commits (the last position it covers)."""
        self.advanced_to = position

    def dead_letter(self, letter: DeadLetter) -> None:
        """Record a dead letter in the same atomic unit."""
        self.dead.append(letter)


B = TypeVar("B", bound=Batch)
Handler = Callable[[RecordedEvent, B], Awaitable[None] | None]
Setup = Callable[[B], Awaitable[None] | None]


def check_projection_name(name: str) -> str:
    """Validate a projection name: a letter, then letters, digits or `_` (it names tables)."""
    if not _NAME_RE.match(name):
        raise InvalidNameError(
            kind="projection name",
            name=name,
            reason="use a letter, then up to 62 letters, digits or '_' (it becomes a key "
            "prefix and part of SQL table names)",
        )
    return name


class Projection(Generic[B]):
    """A named set of handlers over event types, folding events into one read model.

    Example:
        >>> counts: Projection[RedisBatch] = Projection("counts")
        >>> @counts.on("order.placed")
        ... def _placed(event: RecordedEvent, batch: RedisBatch) -> None:
        ...     batch.command("HINCRBY", batch.key("orders"), event.stream, 1)

    Args:
        name: letters, digits and `_`; it names keys and tables.
        categories: only events of these stream categories are read (empty: all).
        on_poison: `skip` or `stop` when a handler keeps failing (see OnPoison).
        retry: how a failing handler is retried before its event becomes a dead letter.
        setup: run in the first batch of every new generation (create tables, indexes).
    """

    def __init__(
        self,
        name: str,
        *,
        categories: Sequence[str] = (),
        on_poison: OnPoison = "skip",
        retry: RetryPolicy | None = None,
        setup: Setup[B] | None = None,
    ) -> None:
        if on_poison not in ("skip", "stop"):
            raise ValueError(f"projection {name!r}: on_poison must be 'skip' or 'stop'")
        self.name = check_projection_name(name)
        self.filter = EventFilter(categories=tuple(categories))
        self.on_poison: OnPoison = on_poison
        self.retry = retry or RetryPolicy()
        self.setup = setup
        self.handlers: dict[str, Handler[B]] = {}

    def on(self, *types: str) -> Callable[[Handler[B]], Handler[B]]:
        """Decorator: `handler(event, batch)` (sync or async) applies events of `types`.

        Use `"*"` (ANY_TYPE) for every type that has no handler of its own.
        """
        if not types:
            raise ValueError(f"projection {self.name!r}: on() needs at least one event type")

        def decorate(handler: Handler[B]) -> Handler[B]:
            for type_name in types:
                self.handlers[type_name] = handler
            return handler

        return decorate

    def handler_for(self, type_name: str) -> Handler[B] | None:
        """The handler of `type_name` (or the catch-all), None when the projection ignores it."""
        return self.handlers.get(type_name) or self.handlers.get(ANY_TYPE)

    async def apply(self, event: RecordedEvent, batch: B) -> None:
        """Run the handler of `event` (if any) on `batch`."""
        handler = self.handler_for(event.type)
        if handler is not None:
            result = handler(event, batch)
            if result is not None and inspect.isawaitable(result):
                await result

    async def prepare(self, batch: B) -> None:
        """Run `setup` on the first batch of a new generation."""
        if self.setup is not None:
            result = self.setup(batch)
            if inspect.isawaitable(result):
                await result

    def __repr__(self) -> str:
        return f"Projection({self.name!r}, types={sorted(self.handlers)})"


class BatchConflict(Exception):
    """The checkpoint or the active generation moved under a batch; nothing was written.

    Internal to the runner: it re-reads where it is and carries on.
    """


class DeferredWriteError(Exception):
    """A write that a handler deferred to the end of its batch failed when it was flushed.

    Which event's write it was is not known: the runner re-applies the batch in halves until the
    failing event is alone, then treats it as a poison event. Internal to the runner.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class ReadModel(AsyncClosing, abc.ABC, Generic[B]):
    """Where projections keep their models, checkpoints, generations and dead letters.

    Backends implement the atomic batch (model change + checkpoint + dead letters), the
    generation pointer and its swap, and dropping a generation.
    """

    description: str = "read model"

    @abc.abstractmethod
    async def prepare(self, projection: Projection[B]) -> int:
        """The active generation of `projection`, creating generation 1 (set up) if none."""

    @abc.abstractmethod
    async def active_generation(self, name: str) -> int | None:
        """The generation readers see, or None when the projection never ran here."""

    @abc.abstractmethod
    async def checkpoint(self, name: str, generation: int | None = None) -> int:
        """The last position applied to `generation` (default: the active one); 0 if none."""

    @abc.abstractmethod
    def batch(
        self, name: str, generation: int, expected_checkpoint: int, *, active: bool
    ) -> AbstractAsyncContextManager[B]:
        """An atomic unit on `generation`: committed on a clean exit, discarded on an error.

        It commits only if the checkpoint is still `expected_checkpoint` and (when `active`)
        the generation is still the active one; otherwise it raises BatchConflict.
        """

    @abc.abstractmethod
    async def new_generation(self, projection: Projection[B]) -> int:
        """Allocate an empty generation (set up, checkpoint 0) that readers do not see yet."""

    @abc.abstractmethod
    async def swap(self, name: str, generation: int, *, expected_active: int) -> bool:
        """Make `generation` the active one, atomically, if its checkpoint is at least the
        active one's; return False (changing nothing) if it is behind.

        Raises:
            RebuildConflictError: the active generation is not `expected_active`.
        """

    @abc.abstractmethod
    async def drop_generation(self, name: str, generation: int) -> None:
        """Delete a generation's model, checkpoint and dead letters (not the active one)."""

    @abc.abstractmethod
    async def dead_letters(self, name: str, generation: int | None = None) -> list[DeadLetter]:
        """The dead letters of `generation` (default: the active one), by position."""

    @abc.abstractmethod
    async def write_stats(self, name: str, stats: RunnerStats) -> None:
        """Keep what a runner reports about itself (not part of any batch)."""

    @abc.abstractmethod
    async def read_stats(self, name: str) -> RunnerStats | None:
        """What the runner of `name` last reported, if anything."""

    @abc.abstractmethod
    async def projections(self) -> list[str]:
        """The names of the projections this model holds, sorted."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""


def encode_json(value: Any) -> str:
    """Compact JSON text of a value (structs, datetimes and dicts alike)."""
    return msgspec.json.encode(value).decode()
