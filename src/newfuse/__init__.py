"""newfuse: an event-sourced agent-to-agent message bus on NATS JetStream.

The public surface, by topic; everything else is reached through its sub-package.
"""

from newfuse.config import Settings
from newfuse.errors import (
    AtomicBatchUnsupportedError,
    BatchTooLargeError,
    ClosedDuringAppendError,
    ConfigError,
    ConnectionLostError,
    CorruptStoreFileError,
    DuplicateEventError,
    EventStoreError,
    ForeignStoreFileError,
    FuseError,
    InvalidEventError,
    InvalidNameError,
    InvalidPayloadError,
    ProjectionStoppedError,
    PublishTimeoutError,
    ReadInterruptedError,
    SchemaError,
    StoreClosedError,
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
    "SchemaError",
    "UnknownTypeError",
    "UnknownVersionError",
    # errors: the event store (appending, reading, its server, closing)
    "AtomicBatchUnsupportedError",
    "BatchTooLargeError",
    "ClosedDuringAppendError",
    "CorruptStoreFileError",
    "DuplicateEventError",
    "EventStoreError",
    "ForeignStoreFileError",
    "PublishTimeoutError",
    "ReadInterruptedError",
    "StoreClosedError",
    "StoreUnavailableError",
    "StreamConfigError",
    "StreamCreateError",
    "WrongExpectedVersionError",
    # errors: projections
    "ProjectionStoppedError",
]
