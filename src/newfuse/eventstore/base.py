"""The EventStore contract every backend honours, and the parts all backends share.

A backend subclasses EventStore and implements the protected `_append`, `_read`, `_read_all`,
`_head_position`, `_stream_version` and `_close`; the public methods validate input, encode
payloads and decode envelopes once, here, so every backend behaves the same.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, Self, TypeVar

import msgspec

from newfuse._closing import AsyncClosing
from newfuse.errors import (
    BatchTooLargeError,
    DuplicateEventError,
    EventTooLargeError,
    FuseError,
    InvalidEnvelopeError,
    InvalidEventError,
    InvalidPayloadError,
    KeyNotLoadedError,
    NestingTooDeepError,
    SealedValueError,
    SealingUnavailableError,
    StoreClosedError,
    UnknownTypeError,
    WrongExpectedVersionError,
)
from newfuse.schemas import (
    ENVELOPE_ENCODER,
    MAX_NESTING_DEPTH,
    Certified,
    Envelope,
    FieldCipher,
    NewEvent,
    Opened,
    RecordedEvent,
    SchemaRegistry,
    SealedValue,
    StreamName,
    TraceContext,
    check_category,
    check_data_depth,
    check_event_id,
    check_type_name,
    default_registry,
    open_unregistered,
    out_of_place,
    parse_envelope,
    utcnow,
)
from newfuse.telemetry import current_trace_context, meter

_T = TypeVar("_T")

log = logging.getLogger("newfuse.eventstore")

_APPENDED = meter().create_counter(
    "newfuse.store.appended",
    unit="{event}",
    description="events this process appended and the store acknowledged, by backend",
)

MAX_BATCH = 1000
"""Most events one append may carry (JetStream's atomic batch limit, ADR-50; kept for all)."""


class ExpectedVersion(enum.Enum):
    """Expectations about a stream's version other than an exact number."""

    ANY = "any"
    NO_STREAM = "no-stream"
    STREAM_EXISTS = "stream-exists"

    def __str__(self) -> str:
        return self.value


ANY = ExpectedVersion.ANY
NO_STREAM = ExpectedVersion.NO_STREAM
STREAM_EXISTS = ExpectedVersion.STREAM_EXISTS

Expected = int | ExpectedVersion


def parse_expected(value: str | int | ExpectedVersion) -> Expected:
    """`3`, `"3"`, `"any"`, `"no-stream"` or `"stream-exists"` -> an expected version."""
    if isinstance(value, ExpectedVersion):
        return value
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        for member in ExpectedVersion:
            if member.value == value:
                return member
    raise ValueError(
        f"expected version {value!r}: use a number >= 0, 'any', 'no-stream' or 'stream-exists'"
    )


def check_expected(expected: Expected, actual: int) -> bool:
    """True if a stream at `actual` meets `expected` (0 means the stream has no events)."""
    if expected is ANY:
        return True
    if expected is NO_STREAM:
        return actual == 0
    if expected is STREAM_EXISTS:
        return actual > 0
    return actual == expected


def wrong_expected(stream: str, expected: Expected, actual: int) -> WrongExpectedVersionError:
    """The error for an append to `stream` (at `actual`) that expected `expected`."""
    return WrongExpectedVersionError(
        stream=stream,
        expected=expected if isinstance(expected, int) else expected.value,
        actual=actual,
    )


def duplicate_in_batch(stream: str, ids: Sequence[str]) -> DuplicateEventError | None:
    """The error for a batch that holds an event id more than once, None when all differ."""
    if len(set(ids)) == len(ids):
        return None
    twice = next(event_id for event_id in ids if ids.count(event_id) > 1)
    places = [str(index) for index, event_id in enumerate(ids, 1) if event_id == twice]
    times = "twice" if len(places) == 2 else f"{len(places)} times"
    return DuplicateEventError(
        stream=stream,
        event_id=twice,
        reason=f"appears {times} in one batch (events {', '.join(places[:-1])} and "
        f"{places[-1]} of {len(ids)}); nothing was written — give each event its own id",
    )


async def _nothing() -> AsyncIterator[RecordedEvent]:
    return
    yield  # an async generator that yields nothing


class AppendResult(msgspec.Struct, frozen=True, kw_only=True):
    """Where an append put its events: versions in the stream, global positions, ids."""

    stream: str
    first_version: int
    last_version: int
    first_position: int
    last_position: int
    ids: tuple[str, ...]

    @classmethod
    def of(
        cls,
        stream: str,
        ids: Sequence[str],
        first_version: int,
        first_position: int,
        last_position: int | None = None,
    ) -> AppendResult:
        """The result for events `ids` stored at consecutive versions from `first_version`,
        at positions `first_position`..`last_position` (default: consecutive as well)."""
        count = len(ids)
        return cls(
            stream=stream,
            first_version=first_version,
            last_version=first_version + count - 1,
            first_position=first_position,
            last_position=first_position + count - 1 if last_position is None else last_position,
            ids=tuple(ids),
        )

    @property
    def version(self) -> int:
        """The stream's version after the append (its last event's version)."""
        return self.last_version

    @property
    def position(self) -> int:
        """The global position of the append's last event."""
        return self.last_position


class EventFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which events to read or subscribe to; empty fields match everything.

    Streams and categories narrow on the server (they are subjects in JetStream); types and
    correlation ids are checked against each envelope.
    """

    streams: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    correlation_id: str | None = None

    def __post_init__(self) -> None:
        for stream in self.streams:
            StreamName.parse(stream)
        for category in self.categories:
            check_category(category, kind="category")

    def matches(self, envelope: Envelope) -> bool:
        if self.streams and envelope.stream not in self.streams:
            return False
        if self.categories and envelope.stream.partition(".")[0] not in self.categories:
            return False
        if self.types and envelope.type not in self.types:
            return False
        return self.correlation_id is None or envelope.correlation_id == self.correlation_id


class StreamInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What `EventStore.stream_info` tells of one stream.

    Attributes:
        stream: `<category>.<id>`.
        version: the version of its newest valid event.
        count: messages stored for it; more than `version` when a foreign client wrote
            messages that are not valid events (they are skipped when reading).
        first_position, last_position: global positions of its first and newest valid events.
        first_timestamp, last_timestamp: their envelope times (when the writer created them).
    """

    stream: str
    version: int
    count: int
    first_position: int
    last_position: int
    first_timestamp: datetime
    last_timestamp: datetime


_ID_TIME_SLACK = timedelta(minutes=10)
"""How far around a UUIDv7 id's own time `EventStore.event` looks first (writers' clocks
differ from the store's)."""


class StoredRecord(msgspec.Struct, frozen=True, array_like=True):
    """One message as the log stores it, valid or not: its position, the stream its subject
    (JetStream) or row (SQLite) names, and its body's bytes, untouched (what the audit hashes)."""

    position: int
    stream: str
    body: bytes


class InvalidEventReport(msgspec.Struct, frozen=True, kw_only=True):
    """A stored message that is not a valid event: where it is and what is wrong with it."""

    position: int
    where: str
    error: str


class _Unopened(RecordedEvent, frozen=True, kw_only=True, gc=False):
    """An event checked up to its sealed fields, whose key (subject, kid) is not loaded yet."""

    missing: tuple[str, str]
    where: str


class _NoKeys:
    """The cipher of a store without a key store: nothing seals; every sealed field opens as
    its replacement (the reader cannot know the plaintext, and the rest stays readable)."""

    async def load(self, subjects: object, *, create: bool) -> None:
        return None

    async def fetch(self, missing: object) -> None:
        return None

    async def close(self) -> None:
        return None

    def encrypt(self, subject: str, plaintext: bytes, event_id: str, path: str) -> SealedValue:
        raise AssertionError("a store without a key store seals nothing")

    def decrypt(self, value: SealedValue, event_id: str, path: str) -> bytes | None:
        return None


_NO_KEYS: Final = _NoKeys()
_MAX_SEALED_FIELDS: Final = 64
"""Most key loads one event may need before it is reported (each sealed field names one)."""


class PreparedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event checked and encoded for appending, waiting for its version in the stream."""

    id: str
    type: str
    schema_version: int
    data: bytes
    timestamp: datetime
    correlation_id: str | None
    causation_id: str | None
    trace: TraceContext | None
    metadata: dict[str, str]

    def envelope(self, stream: str, version: int) -> Envelope:
        return Envelope(
            id=self.id,
            stream=stream,
            type=self.type,
            schema_version=self.schema_version,
            version=version,
            timestamp=self.timestamp,
            correlation_id=self.correlation_id,
            causation_id=self.causation_id,
            trace=self.trace,
            metadata=self.metadata,
            data=msgspec.Raw(self.data),
        )

    def encode(self, stream: str, version: int) -> bytes:
        """The wire body: the envelope's UTF-8 JSON."""
        return ENVELOPE_ENCODER.encode(self.envelope(stream, version))


InvalidEventHandler = Callable[[InvalidEventReport], None]


def _active_trace() -> TraceContext | None:
    """The trace context of the active span, stamped on events appended without one."""
    active = current_trace_context()
    if active is None:
        return None
    return TraceContext(traceparent=active[0], tracestate=active[1])


def _check_trace(stream: StreamName, trace: TraceContext) -> None:
    """Trace values travel in headers: printable ASCII (a header ends at CR LF) and bounded.

    W3C's traceparent is 55 characters; vendors propagate at least 512 of tracestate.
    """
    for path, value in (("traceparent", trace.traceparent), ("tracestate", trace.tracestate)):
        if value is None:
            continue
        if len(value) > MAX_TRACE_CHARS:
            reason = f"it is {len(value)} characters long, the limit is {MAX_TRACE_CHARS}"
        elif not (value.isascii() and value.isprintable()):
            reason = (
                "it holds control or non-ASCII characters; W3C trace context is printable ASCII"
            )
        else:
            continue
        raise InvalidEnvelopeError(
            where=f"of an append to {str(stream)!r}", path=f"$.trace.{path}", reason=reason
        )


MAX_TRACE_CHARS: Final = 1024
"""Longest traceparent or tracestate an append may carry (they travel in headers)."""


def _log_invalid(report: InvalidEventReport) -> None:
    log.warning(
        "skipped invalid event at position %d (%s): %s", report.position, report.where, report.error
    )


TRACKED_STREAMS: Final = 65_536
"""Streams whose last valid version a `read_all` or subscription remembers to check the next."""


class VersionCheck(dict[str, int]):
    """The place-in-the-log rule for one reader: per stream, the last valid version it saw.

    Each event must carry its stream's previous valid version plus one; one that does not is
    invalid and does not move the stream. Memory is bounded: at most `capacity` streams are
    remembered (the one first seen is forgotten first). A stream the check does not know starts
    at version 0 when the reader began at the start of the log and forgot nothing; otherwise
    (a reader that starts mid-log, or a forgotten stream) its first event is taken as given,
    since what came before it was not read. (A dict of stream -> last version, so the reader's
    common case, the next version of a known stream, costs one lookup and one store.)
    """

    __slots__ = ("_capacity", "_exact")

    def __init__(self, *, from_start: bool, capacity: int = TRACKED_STREAMS) -> None:
        super().__init__()
        self._exact = from_start
        self._capacity = capacity

    def admit(self, envelope: Envelope, where: str) -> None:
        """Accept `envelope` as its stream's next event, or raise why it is out of place.

        Raises:
            InvalidEnvelopeError: its version is not the previous valid one's plus one.
        """
        stream = envelope.stream
        last = self.get(stream)
        if last is None and not self._exact:
            last = envelope.version - 1
        reason = out_of_place(envelope, last or 0)
        if reason is not None:
            raise InvalidEnvelopeError(where=where, path="$.version", reason=reason)
        if stream not in self and len(self) >= self._capacity:
            del self[next(iter(self))]  # the stream seen first goes first
            self._exact = False  # a stream not known from now on may be a forgotten one
        self[stream] = envelope.version


class Subscription(AsyncClosing):
    """A live feed of events: catch-up from a position, then new events as they are stored.

    Use as `async with store.subscribe(...) as sub: async for event in sub: ...`. To stop a
    consumer from elsewhere, call `await sub.close()` from any task: the consumer's `async for`
    ends (no error), also while it waits for the next event. If the store itself closes, the
    iteration raises StoreClosedError instead.
    """

    def __init__(self, source: AsyncIterator[RecordedEvent]) -> None:
        self._source = source
        self._closed = False
        self._reader: asyncio.Task[object] | None = None  # the task inside __anext__, if any
        self._stopping: int | None = None  # the reader's cancelling() count before close()
        self._left: asyncio.Future[None] | None = None  # resolved when the reader leaves

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RecordedEvent:
        if self._closed:
            raise StopAsyncIteration
        reader = self._reader = asyncio.current_task()
        try:
            return await anext(self._source)
        except asyncio.CancelledError:
            # close() from another task cancels the waiting reader (the source cannot be
            # closed while it runs); that cancellation ends the iteration, any other goes on.
            baseline, self._stopping = self._stopping, None
            if baseline is None or reader is None or reader.uncancel() > baseline:
                raise
            raise StopAsyncIteration from None
        finally:
            self._reader = None
            if self._left is not None and not self._left.done():
                self._left.set_result(None)

    async def close(self) -> None:
        """Stop the feed and release its consumer; callable from any task. Idempotent."""
        if self._closed:
            return
        self._closed = True
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            self._left = asyncio.get_running_loop().create_future()
            self._stopping = reader.cancelling()
            reader.cancel()
            await self._left  # the source ran its cleanup on the way out
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()


class EventStore(AsyncClosing, abc.ABC):
    """An append-only log of events, grouped in streams named `<category>.<id>`.

    Versions count from 1 within a stream; positions are global and monotonic. Every backend
    passes the same conformance suite (tests/conformance).
    """

    max_batch: int = MAX_BATCH
    bounded_reads: bool = True
    """Whether reads check MAX_NESTING_DEPTH before decoding (see `parse_envelope`)."""

    _opened: bool = True
    """False while the backend still has to `_open` itself (it does so on first use)."""

    def __init__(
        self,
        *,
        registry: SchemaRegistry | None = None,
        on_invalid: InvalidEventHandler | None = None,
    ) -> None:
        self.registry = registry or default_registry()
        self.on_invalid: InvalidEventHandler = on_invalid or _log_invalid
        self.cipher: FieldCipher | None = None
        """Seals and opens the personal and secret fields of payloads (newfuse.security's
        `use_keys` sets it); without one such fields cannot be appended and read as redacted."""
        self._closed = False

    # -- writing ----------------------------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent] | NewEvent,
        expected_version: Expected = ANY,
    ) -> AppendResult:
        """Append events to `stream`, all or nothing.

        Args:
            stream: `<category>.<id>`.
            events: one event or several (stored atomically, in order).
            expected_version: a version number, or ANY / NO_STREAM / STREAM_EXISTS.

        Returns:
            Where the events went. Appending the same event ids again returns the first result.

        Raises:
            WrongExpectedVersionError: the stream is not at `expected_version`; nothing written.
            InvalidNameError, SchemaError (InvalidEventError, ...), BatchTooLargeError: bad
                input; nothing written.
        """
        self._check_open()
        name = StreamName.parse(stream)
        batch = [events] if isinstance(events, NewEvent) else list(events)
        if not batch:
            raise ValueError(f"append to {stream!r}: no events given")
        if len(batch) > self.max_batch:
            raise BatchTooLargeError(stream=stream, size=len(batch), limit=self.max_batch)
        if isinstance(expected_version, int) and expected_version < 0:
            raise ValueError(f"append to {stream!r}: expected version must be >= 0")
        if len(batch) > 1:
            twice = duplicate_in_batch(stream, [event.id for event in batch])
            if twice is not None:
                raise twice
        prepared = [self._prepare(name, event) for event in batch]
        if self.registry.any_sealed:
            prepared = await self._seal(stream, prepared)
        limit = self.max_event_bytes
        if limit is not None:
            for event in prepared:  # the data alone too large: refused before any round trip
                if len(event.data) > limit:
                    raise EventTooLargeError(
                        stream=stream,
                        event_id=event.id,
                        size=len(event.data),
                        limit=limit,
                        limit_name=self._max_event_bytes_name,
                    )
        if not self._opened:
            await self._open()
        result = await self._append(stream, prepared, expected_version)
        _APPENDED.add(len(prepared), {"backend": self.backend})
        return result

    backend: str = "store"
    """The backend's name in metrics (`jetstream`, `sqlite`)."""

    @property
    def max_event_bytes(self) -> int | None:
        """Largest event the store can take in one message, if it has a limit (bytes)."""
        return None

    _max_event_bytes_name: str = "the store's limit"
    """How `max_event_bytes` is named in EventTooLargeError."""

    @property
    def verifies_signers(self) -> bool:
        """Whether what this store reads carries its checked signer (`RecordedEvent.signer`):
        a JetStream store on a connection that trusts admin keys. When False, `signer` is
        always None and who wrote an event is what the event says."""
        return False

    @property
    def identity(self) -> Certified | None:
        """Who this store's appends are signed as (its credentials' certificate), if anyone."""
        return None

    def _prepare(self, stream: StreamName, event: NewEvent) -> PreparedEvent:
        check_event_id(event.id)
        type_name, version = event.type, event.schema_version
        if isinstance(event.data, msgspec.Struct) and (type_name is None or version is None):
            registered_type, registered_version = self.registry.type_of(event.data)
            type_name = type_name or registered_type
            version = version or registered_version
        if type_name is None:
            raise InvalidEventError(
                stream=str(stream),
                event_id=event.id,
                reason="has no type; give NewEvent(type=...) or a registered payload struct",
            )
        check_type_name(type_name)
        if version is None:
            version = (
                self.registry.latest_version(type_name)
                if self.registry.is_registered(type_name)
                else 1
            )
        elif version < 1:
            raise InvalidEventError(
                stream=str(stream),
                event_id=event.id,
                reason=f"has schema version {version}; schema versions count from 1",
            )
        if self.registry.is_strict(stream.category) and not self.registry.is_registered(type_name):
            raise UnknownTypeError(
                type_name=type_name, context=f"category {stream.category!r} is strict"
            )
        try:
            data = self.registry.encode(type_name, version, event.data)
        except RecursionError:  # nested past what the encoder can follow at all
            raise NestingTooDeepError(
                type_name=type_name, version=version, depth=None, limit=MAX_NESTING_DEPTH
            ) from None
        if event.trace is not None:
            _check_trace(stream, event.trace)
        return PreparedEvent(
            id=event.id,
            type=type_name,
            schema_version=version,
            data=check_data_depth(data, type_name=type_name, version=version),
            timestamp=utcnow(),
            correlation_id=event.correlation_id,
            causation_id=event.causation_id,
            trace=event.trace or _active_trace(),
            metadata=event.metadata,
        )

    async def _seal(self, stream: str, prepared: list[PreparedEvent]) -> list[PreparedEvent]:
        """`prepared` with the sealed fields of each payload encrypted (keys made as needed)."""
        plans = [self.registry.sealed(event.type, event.schema_version) for event in prepared]
        if not any(plans):
            return prepared
        cipher = self.cipher
        subjects: set[str] = set()
        for event, plan in zip(prepared, plans, strict=True):
            if plan is None:
                continue
            if cipher is None:
                raise SealingUnavailableError(
                    stream=stream,
                    type_name=event.type,
                    fields=[field.path for field in plan.fields],
                )
            try:
                subjects |= plan.subjects(event.data, stream)
            except ValueError as error:
                raise InvalidPayloadError(
                    type_name=event.type, version=event.schema_version, path="$", reason=str(error)
                ) from None
        assert cipher is not None  # a plan without a cipher raised above
        await cipher.load(subjects, create=True)
        return [
            event
            if plan is None
            else msgspec.structs.replace(
                event, data=plan.seal(event.data, event.id, stream, cipher)
            )
            for event, plan in zip(prepared, plans, strict=True)
        ]

    @abc.abstractmethod
    async def _append(
        self, stream: str, events: list[PreparedEvent], expected: Expected
    ) -> AppendResult: ...

    # -- reading ----------------------------------------------------------------------------------

    def read(
        self,
        stream: str,
        from_version: int | None = None,
        limit: int | None = None,
        *,
        backwards: bool = False,
    ) -> AsyncIterator[RecordedEvent]:
        """The events of one stream in version order (or reversed), from `from_version`.

        Forwards, `from_version` is the first version wanted (default: 1); backwards, it is the
        highest (default: the last).
        """
        self._check_open()
        StreamName.parse(stream)
        if limit is not None and limit < 0:
            raise ValueError(f"read {stream!r}: limit must be >= 0, got {limit}")
        if limit == 0:
            return _nothing()
        if not backwards:
            from_version = max(from_version or 1, 1)
        return self._opening(self._keyed(self._read(stream, from_version, limit, backwards)))

    @abc.abstractmethod
    def _read(
        self, stream: str, from_version: int | None, limit: int | None, backwards: bool
    ) -> AsyncIterator[RecordedEvent]:
        """Backends: `from_version` is None only backwards, meaning "from the last event";
        `limit` is None or > 0."""

    def read_all(
        self,
        from_position: int = 1,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        filter: EventFilter | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        """Every event in position order from `from_position` (or from the first at/after
        `since`), up to `until`, matching `filter`; stops at the head as it was when called."""
        self._check_open()
        if limit is not None and limit < 0:
            raise ValueError(f"read_all: limit must be >= 0, got {limit}")
        if limit == 0:
            return _nothing()
        return self._opening(
            self._keyed(
                self._read_all(max(from_position, 1), since, until, filter or EventFilter(), limit)
            )
        )

    @abc.abstractmethod
    def _read_all(
        self,
        from_position: int,
        since: datetime | None,
        until: datetime | None,
        filter: EventFilter,
        limit: int | None,
    ) -> AsyncIterator[RecordedEvent]:
        """Backends: `limit` is None or > 0."""

    def records(self, from_position: int = 1) -> AsyncIterator[StoredRecord]:
        """Every message stored at `from_position` and after, as stored (nothing decoded or
        checked: foreign and invalid ones too), in position order, up to the head as it was
        when called. A position with no message (deleted) is simply absent."""
        self._check_open()
        return self._opening(self._records(max(from_position, 1)))

    @abc.abstractmethod
    def _records(self, from_position: int) -> AsyncIterator[StoredRecord]: ...

    def subscribe(
        self,
        filter: EventFilter | None = None,
        from_position: int = 1,
        *,
        name: str | None = None,
    ) -> Subscription:
        """Catch up from `from_position`, then follow new events live: in order, no gaps, no
        duplicates, across reconnects. Close it (or use `async with`) to stop. `name` says who
        reads (e.g. `projection agent_state`): `subscribers()` finds where its feed sits."""
        self._check_open()
        return Subscription(
            self._opening(
                self._keyed(self._subscribe(filter or EventFilter(), max(from_position, 1), name))
            )
        )

    @abc.abstractmethod
    def _subscribe(
        self, filter: EventFilter, from_position: int, name: str | None = None
    ) -> AsyncIterator[RecordedEvent]: ...

    async def subscribers(self) -> dict[str, str]:
        """Named live feeds of every process on this store -> the server each sits on.

        Only a store whose feeds live on servers knows (JetStream: the consumer's server, its
        leader on a cluster); the others have none to tell.
        """
        return {}

    async def head_position(self) -> int:
        """The global position of the newest event (0 when the store is empty)."""
        self._check_open()
        if not self._opened:
            await self._open()
        return await self._head_position()

    @abc.abstractmethod
    async def _head_position(self) -> int: ...

    async def stream_version(self, stream: str) -> int:
        """The version of the newest event of `stream` (0 when it has none)."""
        self._check_open()
        StreamName.parse(stream)
        if not self._opened:
            await self._open()
        return await self._stream_version(stream)

    @abc.abstractmethod
    async def _stream_version(self, stream: str) -> int: ...

    # -- looking up -------------------------------------------------------------------------------

    async def streams(self, category: str | None = None) -> AsyncIterator[str]:
        """The names of the streams that hold messages (of `category`, if given), sorted."""
        self._check_open()
        if category is not None:
            check_category(category)
        if not self._opened:
            await self._open()
        async for name in self._streams(category):
            yield name

    @abc.abstractmethod
    def _streams(self, category: str | None) -> AsyncIterator[str]: ...

    async def stream_info(self, stream: str) -> StreamInfo | None:
        """Version, message count, first and last position and time of `stream`; None when it
        holds no valid event."""
        first = await _first(self.read(stream, limit=1))
        last = await _first(self.read(stream, limit=1, backwards=True))
        if first is None or last is None:
            return None  # the reads opened the backend, if it had to be
        return StreamInfo(
            stream=stream,
            version=last.version,
            count=await self._stream_count(stream),
            first_position=first.position,
            last_position=last.position,
            first_timestamp=first.timestamp,
            last_timestamp=last.timestamp,
        )

    @abc.abstractmethod
    async def _stream_count(self, stream: str) -> int:
        """Messages stored for `stream`, valid events or not."""

    async def event_at(self, position: int) -> RecordedEvent | None:
        """The event at global `position`; None when there is none or it is not valid."""
        self._check_open()
        if position < 1:
            return None
        found = await _first(self.read_all(position, limit=1))
        return found if found is not None and found.position == position else None

    async def event(self, id: str) -> RecordedEvent | None:
        """The event with this id, None when none is stored.

        A backend without an index by id reads around the id's own time first when it is a
        UUIDv7 (as newfuse makes them), then everything.
        """
        self._check_open()
        found = await self._event(id)
        if isinstance(found, _Unopened):
            return await self._complete(found)
        return found

    async def _event(self, id: str) -> RecordedEvent | None:
        created = _uuid7_time(id)
        if created is not None:
            nearby = self.read_all(since=created - _ID_TIME_SLACK, until=created + _ID_TIME_SLACK)
            async for event in nearby:
                if event.id == id:
                    return event
        async for event in self.read_all():
            if event.id == id:
                return event
        return None

    # -- decoding ---------------------------------------------------------------------------------

    def decode(
        self,
        body: bytes,
        position: int,
        where: str,
        stream: str,
        versions: VersionCheck | None = None,
        version: int | None = None,
        signer: Certified | None = None,
    ) -> RecordedEvent | None:
        """The one place where a stored body becomes a RecordedEvent, for every reader.

        The envelope must agree with its place: `stream` is the stream its subject (or row)
        names; with `versions` its version must follow the stream's previous valid event, and
        with `version` (a row's) it must be that one. Then the payload is decoded. A body that
        fails any of it is reported to `on_invalid` with its position and reason, and None is
        returned; nothing here raises. `signer` is who the backend found signed it (its
        `verifies_signers`), kept on the event.
        """
        try:
            envelope = parse_envelope(body, where, stream, bounded=self.bounded_reads)
            if versions is not None:
                if versions.get(stream) == envelope.version - 1:  # admit's common case, inline
                    versions[stream] = envelope.version
                else:
                    versions.admit(envelope, where)
            if version is not None and envelope.version != version:
                raise InvalidEnvelopeError(
                    where=where,
                    path="$.version",
                    reason=f"version {envelope.version} is not the version of its row ({version})",
                )
        except FuseError as error:
            self._report(position, where, str(error))
            return None
        except Exception as error:  # a decoder bug must not stop a reader either
            self._report(position, where, f"decoding raised {type(error).__name__}: {error}")
            return None
        return self._payload(position, where, envelope, signer=signer)

    def _payload(
        self,
        position: int,
        where: str,
        envelope: Envelope,
        cipher: FieldCipher | None = None,
        *,
        signer: Certified | None = None,
    ) -> RecordedEvent | None:
        """The event of a checked envelope: its payload opened (sealed fields decrypted, or
        their replacements) and decoded; None, reported, when it is not valid. An event whose
        key the cipher has not loaded comes back unopened, for `_keyed` to finish."""
        redacted: tuple[str, ...] = ()
        try:
            plan = self.registry.sealed(envelope.type, envelope.schema_version)
            opened: Opened | None = None
            if plan is not None:
                opened = plan.open(
                    bytes(envelope.data), envelope.id, envelope.stream, cipher or self._opener()
                )
            elif self.cipher is not None and not self.registry.is_registered(envelope.type):
                opened = open_unregistered(bytes(envelope.data), envelope.id, cipher or self.cipher)
            if opened is not None:
                envelope = msgspec.structs.replace(envelope, data=msgspec.Raw(opened.data))
                redacted = opened.redacted
            data = self.registry.decode(envelope.type, envelope.schema_version, envelope.data)
        except KeyNotLoadedError as missing:
            return _Unopened(
                position=position,
                envelope=envelope,
                data=None,
                missing=(missing.subject, missing.kid),
                where=where,
                signer=signer,
            )
        except ValueError as error:  # sealed fields that are no sealed values (plan.open)
            if not isinstance(error, FuseError):
                error = SealedValueError(event_id=envelope.id, path="$", reason=str(error))
            self._report(position, where, str(error))
            return None
        except FuseError as error:
            self._report(position, where, str(error))
            return None
        except Exception as error:  # a decoder or upcaster bug must not stop a reader either
            self._report(position, where, f"decoding raised {type(error).__name__}: {error}")
            return None
        return RecordedEvent(
            position=position, envelope=envelope, data=data, redacted=redacted, signer=signer
        )

    def _opener(self) -> FieldCipher:
        return self.cipher or _NO_KEYS

    def _keyed(self, source: AsyncIterator[RecordedEvent]) -> AsyncIterator[RecordedEvent]:
        """`source`, with the events whose keys were not loaded yet finished after loading
        them (`decode` is synchronous; the key store is not). No layer without keys or sealed
        types."""
        sealing = self.cipher is not None or self.registry.any_sealed
        return self._finishing(source) if sealing else source

    async def _finishing(
        self, source: AsyncIterator[RecordedEvent]
    ) -> AsyncIterator[RecordedEvent]:
        try:
            async for event in source:
                if isinstance(event, _Unopened):
                    finished = await self._complete(event)
                    if finished is not None:
                        yield finished
                else:
                    yield event
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _complete(self, event: _Unopened) -> RecordedEvent | None:
        """Load the keys `event` waits for, then open and decode it (None: reported invalid).
        Each load settles one (subject, key id): it opens, or is known forgotten."""
        cipher = self._opener()
        result: RecordedEvent | None = event
        for _ in range(_MAX_SEALED_FIELDS):
            if not isinstance(result, _Unopened):
                return result
            await cipher.fetch([result.missing])
            result = self._payload(
                event.position, event.where, event.envelope, cipher, signer=event.signer
            )
        if isinstance(result, _Unopened):
            self._report(event.position, event.where, "its sealed fields name too many keys")
            return None
        return result

    def _report(self, position: int, where: str, error: str) -> None:
        try:
            self.on_invalid(InvalidEventReport(position=position, where=where, error=error))
        except Exception:  # the reporter's own failure is logged, the reader goes on
            log.exception("on_invalid failed for the invalid event at position %d", position)

    # -- lifecycle --------------------------------------------------------------------------------

    async def _open(self) -> None:
        """Backends that set `_opened` False: get ready for use (provision), then set it True.
        Called before the first operation that needs the backend; must be idempotent."""

    def _opening(self, source: AsyncIterator[_T]) -> AsyncIterator[_T]:
        """`source`, behind `_open` while the backend is not open yet."""
        return source if self._opened else self._open_then(source)

    async def _open_then(self, source: AsyncIterator[_T]) -> AsyncIterator[_T]:
        try:
            await self._open()
            async for event in source:
                yield event
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(store=type(self).__name__)

    async def close(self) -> None:
        """Release connections and background tasks. Idempotent."""
        if not self._closed:
            self._closed = True
            try:
                await self._close()
            finally:
                if self.cipher is not None:
                    await self.cipher.close()

    @abc.abstractmethod
    async def _close(self) -> None: ...


async def _first(events: AsyncIterator[RecordedEvent]) -> RecordedEvent | None:
    """The first of `events` (None when there is none); the iterator is closed after it."""
    try:
        async for event in events:
            return event
        return None
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def _uuid7_time(id: str) -> datetime | None:
    """When a UUIDv7 (RFC 9562) was made, from its first 48 bits; None for other ids."""
    try:
        value = uuid.UUID(id)
    except ValueError:
        return None
    if value.version != 7:
        return None
    return datetime.fromtimestamp((value.int >> 80) / 1000, tz=UTC)
