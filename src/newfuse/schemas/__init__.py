"""Versioned msgspec schemas: the envelope, built-in payloads, the type registry, JSON Schema."""

from newfuse.schemas.envelope import (
    ENVELOPE_DECODER,
    ENVELOPE_ENCODER,
    Envelope,
    NewEvent,
    RecordedEvent,
    TraceContext,
)
from newfuse.schemas.ids import new_event_id
from newfuse.schemas.names import StreamName, check_token
from newfuse.schemas.payloads import A2AMessage, A2AMetadata, StateUpdate, Transaction, utcnow
from newfuse.schemas.registry import SchemaRegistry, Upcaster, default_registry

__all__ = [
    "ENVELOPE_DECODER",
    "ENVELOPE_ENCODER",
    "A2AMessage",
    "A2AMetadata",
    "Envelope",
    "NewEvent",
    "RecordedEvent",
    "SchemaRegistry",
    "StateUpdate",
    "StreamName",
    "TraceContext",
    "Transaction",
    "Upcaster",
    "check_token",
    "default_registry",
    "new_event_id",
    "utcnow",
]
