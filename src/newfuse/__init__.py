"""newfuse: an event-sourced agent-to-agent message bus on NATS JetStream.

The public surface, by topic; everything else is reached through its sub-package. Names are
imported when first used (PEP 562), so `import newfuse` (and `fuse --help`) stays quick and
loads no NATS, Redis or SQLite client until one is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from newfuse.config import Settings
    from newfuse.errors import (
        AtomicBatchUnsupportedError,
        BatchTooLargeError,
        ClosedDuringAppendError,
        ConfigError,
        ConnectionLostError,
        CorruptStoreFileError,
        DuplicateEventError,
        ElectionTimeoutError,
        EventStoreError,
        EventTooLargeError,
        ForeignStoreFileError,
        FuseError,
        InvalidEventError,
        InvalidNameError,
        InvalidPayloadError,
        NameTooLongError,
        NestingTooDeepError,
        ProjectionStoppedError,
        PublishTimeoutError,
        ReadInterruptedError,
        ReadOnlyStoreError,
        SchemaError,
        StoreClosedError,
        StoreConnectionClosedError,
        StoreFileError,
        StoreUnavailableError,
        StreamConfigError,
        StreamCreateError,
        UnknownTypeError,
        UnknownVersionError,
        WrongExpectedVersionError,
    )
    from newfuse.eventstore import (
        ANY,
        NO_STREAM,
        STREAM_EXISTS,
        AppendResult,
        EventFilter,
        EventStore,
        Subscription,
        open_event_store,
    )
    from newfuse.nats import NatsServer, ValkeyServer
    from newfuse.projections import (
        AgentStateView,
        AuditIndex,
        Projection,
        ProjectionGroup,
        ProjectionRunner,
        RedisReadModel,
        SQLiteReadModel,
        rebuild,
    )
    from newfuse.schemas import (
        A2AMessage,
        A2AMetadata,
        Envelope,
        NewEvent,
        RecordedEvent,
        SchemaRegistry,
        StateUpdate,
        TraceContext,
        Transaction,
        default_registry,
    )

_MODULES: dict[str, tuple[str, ...]] = {
    "newfuse.config": ("Settings",),
    "newfuse.errors": (
        "AtomicBatchUnsupportedError",
        "BatchTooLargeError",
        "ClosedDuringAppendError",
        "ConfigError",
        "ConnectionLostError",
        "CorruptStoreFileError",
        "DuplicateEventError",
        "ElectionTimeoutError",
        "EventStoreError",
        "EventTooLargeError",
        "ForeignStoreFileError",
        "FuseError",
        "InvalidEventError",
        "InvalidNameError",
        "InvalidPayloadError",
        "NameTooLongError",
        "NestingTooDeepError",
        "ProjectionStoppedError",
        "PublishTimeoutError",
        "ReadInterruptedError",
        "ReadOnlyStoreError",
        "SchemaError",
        "StoreClosedError",
        "StoreConnectionClosedError",
        "StoreFileError",
        "StoreUnavailableError",
        "StreamConfigError",
        "StreamCreateError",
        "UnknownTypeError",
        "UnknownVersionError",
        "WrongExpectedVersionError",
    ),
    "newfuse.eventstore": (
        "ANY",
        "NO_STREAM",
        "STREAM_EXISTS",
        "AppendResult",
        "EventFilter",
        "EventStore",
        "Subscription",
        "open_event_store",
    ),
    "newfuse.nats": ("NatsServer", "ValkeyServer"),
    "newfuse.projections": (
        "AgentStateView",
        "AuditIndex",
        "Projection",
        "ProjectionGroup",
        "ProjectionRunner",
        "RedisReadModel",
        "SQLiteReadModel",
        "rebuild",
    ),
    "newfuse.schemas": (
        "A2AMessage",
        "A2AMetadata",
        "Envelope",
        "NewEvent",
        "RecordedEvent",
        "SchemaRegistry",
        "StateUpdate",
        "TraceContext",
        "Transaction",
        "default_registry",
    ),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    # entry points
    "NatsServer",
    "Settings",
    "ValkeyServer",
    "open_event_store",
    # events and schemas
    "A2AMessage",
    "A2AMetadata",
    "Envelope",
    "NewEvent",
    "RecordedEvent",
    "SchemaRegistry",
    "StateUpdate",
    "TraceContext",
    "Transaction",
    "default_registry",
    # stores
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "EventFilter",
    "EventStore",
    "Subscription",
    # projections
    "AgentStateView",
    "AuditIndex",
    "Projection",
    "ProjectionGroup",
    "ProjectionRunner",
    "RedisReadModel",
    "SQLiteReadModel",
    "rebuild",
    # errors: the base, configuration and connection
    "ConfigError",
    "ConnectionLostError",
    "FuseError",
    # errors: names and schemas
    "InvalidEventError",
    "InvalidNameError",
    "InvalidPayloadError",
    "NameTooLongError",
    "NestingTooDeepError",
    "SchemaError",
    "UnknownTypeError",
    "UnknownVersionError",
    # errors: the event store (appending, reading, its server, closing)
    "AtomicBatchUnsupportedError",
    "BatchTooLargeError",
    "ClosedDuringAppendError",
    "CorruptStoreFileError",
    "DuplicateEventError",
    "ElectionTimeoutError",
    "EventStoreError",
    "EventTooLargeError",
    "ForeignStoreFileError",
    "PublishTimeoutError",
    "ReadInterruptedError",
    "ReadOnlyStoreError",
    "StoreClosedError",
    "StoreConnectionClosedError",
    "StoreFileError",
    "StoreUnavailableError",
    "StreamConfigError",
    "StreamCreateError",
    "WrongExpectedVersionError",
    # errors: projections
    "ProjectionStoppedError",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'newfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
