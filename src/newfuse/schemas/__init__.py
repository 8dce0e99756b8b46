"""Versioned msgspec schemas: the envelope, built-in payloads, the type registry, JSON Schema."""

from newfuse.schemas.body import (
    MAX_NESTING_DEPTH,
    check_depth,
    nesting_depth,
    out_of_place,
    parse_envelope,
)
from newfuse.schemas.envelope import (
    ENVELOPE_DECODER,
    ENVELOPE_ENCODER,
    MAX_WIRE_INT,
    Envelope,
    NewEvent,
    RecordedEvent,
    TraceContext,
)
from newfuse.schemas.export import (
    JSON_SCHEMA_DIALECT,
    ExportedSchema,
    build_export,
    envelope_schema,
    export_schemas,
    payload_schema,
)
from newfuse.schemas.ids import new_event_id
from newfuse.schemas.names import StreamName, check_token, check_type_name
from newfuse.schemas.payloads import (
    A2AMessage,
    A2AMetadata,
    StateUpdate,
    Timestamp,
    Transaction,
    TransactionStatus,
    as_utc,
    utcnow,
)
from newfuse.schemas.registry import SchemaRegistry, Upcaster, default_registry

__all__ = [
    "ENVELOPE_DECODER",
    "ENVELOPE_ENCODER",
    "JSON_SCHEMA_DIALECT",
    "MAX_NESTING_DEPTH",
    "MAX_WIRE_INT",
    "A2AMessage",
    "A2AMetadata",
    "Envelope",
    "ExportedSchema",
    "NewEvent",
    "RecordedEvent",
    "SchemaRegistry",
    "StateUpdate",
    "StreamName",
    "Timestamp",
    "TraceContext",
    "Transaction",
    "TransactionStatus",
    "Upcaster",
    "as_utc",
    "build_export",
    "check_depth",
    "check_token",
    "check_type_name",
    "default_registry",
    "envelope_schema",
    "export_schemas",
    "nesting_depth",
    "new_event_id",
    "out_of_place",
    "parse_envelope",
    "payload_schema",
    "utcnow",
]
