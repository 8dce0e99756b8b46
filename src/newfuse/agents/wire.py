"""A2A messages as envelopes on the message stream: encoding, checked decoding, derived ids."""

from __future__ import annotations

import uuid
from typing import Any, Final

import msgspec

from newfuse import telemetry
from newfuse.errors import FuseError, InvalidEnvelopeError
from newfuse.nats import headers
from newfuse.schemas import (
    ENVELOPE_DECODER,
    ENVELOPE_ENCODER,
    A2AMessage,
    Envelope,
    SchemaRegistry,
    TraceContext,
    check_depth,
    default_registry,
    utcnow,
)

MESSAGE_TYPE: Final = "a2a.message"
REGISTRY: Final = default_registry()
_ENCODER: Final = msgspec.json.Encoder()
_NAMESPACE: Final = uuid.UUID("6f1c3c9e-2d0b-5a4e-9a55-0c5e1f3a2b77")


def derived_id(message_id: str, consumer: str, name: str) -> str:
    """The id of an effect of handling `message_id` by `consumer`: the same on every redelivery
    (UUIDv5), so a repeated effect is recognised as the same message."""
    return str(uuid.uuid5(_NAMESPACE, f"{consumer}/{message_id}/{name}"))


def encode(
    stream: str,
    type_name: str,
    data: Any,
    *,
    event_id: str,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    trace: TraceContext | None = None,
    metadata: dict[str, str] | None = None,
    registry: SchemaRegistry = REGISTRY,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one message on the message stream.

    `version` is always 1 there: messages are not versioned, their order is the JetStream
    sequence; `stream` names the addressee (`a2a.<type>`, `topic.<topic>`, `reply.<token>`).
    """
    envelope = Envelope(
        id=event_id,
        stream=stream,
        type=type_name,
        version=1,
        timestamp=utcnow(),
        correlation_id=correlation_id,
        causation_id=causation_id,
        trace=trace,
        metadata=metadata or {},
        data=msgspec.Raw(_payload(type_name, data, registry)),
    )
    wire_headers = {headers.MSG_ID: event_id, headers.TYPE: type_name, headers.SCHEMA_VERSION: "1"}
    if trace is not None:
        wire_headers[headers.TRACEPARENT] = trace.traceparent
        if trace.tracestate:
            wire_headers[headers.TRACESTATE] = trace.tracestate
    return ENVELOPE_ENCODER.encode(envelope), wire_headers


def current_trace() -> TraceContext | None:
    """The W3C trace context of the current span, for a message sent now (None without one)."""
    current = telemetry.current_trace_context()
    if current is None:
        return None
    return TraceContext(traceparent=current[0], tracestate=current[1])


def _payload(type_name: str, data: Any, registry: SchemaRegistry) -> bytes:
    # A struct the runtime built is valid by construction; anything else is checked.
    if isinstance(data, msgspec.Struct) and registry.is_registered(type_name):
        if registry.type_of(data) == (type_name, 1):
            return _ENCODER.encode(data)
    return registry.encode(type_name, 1, data)


def decode(body: bytes, where: str) -> tuple[Envelope, A2AMessage]:
    """A delivered A2A message, checked: bounded depth, an envelope, type `a2a.message`, a valid
    payload.

    Raises:
        InvalidEnvelopeError: the body is not such a message (says where and why).
    """
    check_depth(body, where)
    try:
        envelope = ENVELOPE_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise InvalidEnvelopeError(where=where, path="$", reason=str(error)) from None
    if envelope.type != MESSAGE_TYPE:
        raise InvalidEnvelopeError(
            where=where, path="$.type", reason=f"{envelope.type!r} is not {MESSAGE_TYPE!r}"
        )
    try:
        message = REGISTRY.decode(MESSAGE_TYPE, envelope.schema_version, envelope.data)
    except FuseError as error:
        raise InvalidEnvelopeError(where=where, path="$.data", reason=str(error)) from None
    return envelope, message
