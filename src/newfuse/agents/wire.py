"""A2A messages as envelopes on the message stream: encoding, checked decoding (protocol
versions, legacy shapes), derived ids."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Final

import msgspec

from newfuse import telemetry
from newfuse.agents import legacy
from newfuse.errors import (
    FuseError,
    InvalidEnvelopeError,
    InvalidNameError,
    ProtocolVersionError,
    SchemaRegistrationError,
)
from newfuse.nats import headers
from newfuse.schemas import (
    DEFAULT_PROTOCOLS,
    ENVELOPE_DECODER,
    ENVELOPE_ENCODER,
    A2AMessage,
    A2AMetadata,
    Envelope,
    ProtocolVersion,
    SchemaRegistry,
    TraceContext,
    VersionRange,
    check_depth,
    check_token,
    check_type_name,
    default_registry,
    utcnow,
)

MESSAGE_TYPE: Final = "a2a.message"
REGISTRY: Final = default_registry()
_ENCODER: Final = msgspec.json.Encoder()
_NAMESPACE: Final = uuid.UUID("6f1c3c9e-2d0b-5a4e-9a55-0c5e1f3a2b77")
DEFAULT_RANGE: Final = VersionRange.parse(DEFAULT_PROTOCOLS)
PROTOCOL_MAJOR: Final = 1
"""The major protocol version this runtime reads; its minors are `a2a.message` schema versions."""


_NAMESPACE_BYTES: Final = _NAMESPACE.bytes
ONCE_PREFIX: Final = "once-"
"""How the reply token of a request asked once per key begins (`once_token`)."""


def once_ids(key: str) -> tuple[str, str]:
    """The message id and the reply token of a request asked once per `key`
    (`AgentClient.request_once`): derived from the key, so whoever asks again finds the reply
    on `<prefix>.a2a._reply.<token>`, and a runtime handling a copy of the request sees by the
    token's prefix that it may have been answered already."""
    message_id = derived_id(key, "request", "once")
    return message_id, ONCE_PREFIX + message_id.replace("-", "")


def derived_id(message_id: str, consumer: str, name: str) -> str:
    """The id of an effect of handling `message_id` by `consumer`: the same on every redelivery
    (UUIDv5 of `<consumer>/<message id>/<name>` in our namespace), so a repeated effect is
    recognised as the same message. Computed as RFC 9562 says, without the UUID objects that
    `uuid.uuid5` makes (a third of a fast-path call's own time went there)."""
    name_bytes = f"{consumer}/{message_id}/{name}".encode()
    raw = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name_bytes, usedforsecurity=False).digest())
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC variant
    text = raw[:16].hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


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


def current_protocol(registry: SchemaRegistry = REGISTRY) -> ProtocolVersion:
    """The protocol version this registry reads natively: 1.(n - 1) for `a2a.message` schema
    version n (1.0 with the built-in types). An older minor is upcast to it, a newer minor of
    the same major is read with its struct (unknown fields are ignored, as for any payload)."""
    return ProtocolVersion(PROTOCOL_MAJOR, registry.latest_version(MESSAGE_TYPE) - 1)


def reading_registry(registry: SchemaRegistry, agent_type: str) -> SchemaRegistry:
    """`registry`, if agents can read messages with it: its newest `a2a.message` struct is an
    A2AMessage (a subclass adds fields; the runtime reads the base's).

    Raises:
        SchemaRegistrationError: it is not.
    """
    newest = registry.struct_for(MESSAGE_TYPE)
    if not issubclass(newest, A2AMessage):
        raise SchemaRegistrationError(
            type_name=MESSAGE_TYPE,
            version=registry.latest_version(MESSAGE_TYPE),
            reason=f"agent {agent_type!r} reads messages with it, so its struct "
            f"({newest.__qualname__}) must subclass A2AMessage",
        )
    return registry


def decode(
    body: bytes,
    where: str,
    *,
    registry: SchemaRegistry = REGISTRY,
    accepts: VersionRange = DEFAULT_RANGE,
) -> tuple[Envelope, A2AMessage]:
    """A delivered A2A message, checked: bounded depth, an envelope (or a legacy V1/V2 body,
    see legacy.py), type `a2a.message`, a protocol version in `accepts`, a valid payload.

    The message's `metadata.protocol_version` (when absent: the current version) names its
    shape; an older minor version is upcast through `registry` to the current one, so the
    caller sees the current shape. For an `a2a.message` the envelope's `schema_version` is not
    read: the protocol version says the same thing and is what other languages set.

    Raises:
        InvalidEnvelopeError: the body is not such a message (says where and why).
        ProtocolVersionError: its protocol version is not a version, outside `accepts`, or of
            another major version than this registry reads (says both versions).
    """
    envelope = _envelope(body, where)
    if envelope.type != MESSAGE_TYPE:
        raise InvalidEnvelopeError(
            where=where, path="$.type", reason=f"{envelope.type!r} is not {MESSAGE_TYPE!r}"
        )
    newest = registry.latest_version(MESSAGE_TYPE)
    version = _protocol(envelope.data, where, registry, accepts)
    schema_version = newest if version is None else min(version.minor + 1, newest)
    try:
        message = registry.decode(MESSAGE_TYPE, schema_version, envelope.data)
    except FuseError as error:
        raise InvalidEnvelopeError(where=where, path="$.data", reason=str(error)) from None
    if not isinstance(message, A2AMessage):
        raise InvalidEnvelopeError(
            where=where,
            path="$.data",
            reason=f"the registry decodes {MESSAGE_TYPE!r} v{schema_version} into "
            f"{type(message).__qualname__}, which is not an A2AMessage (register a subclass)",
        )
    return envelope, message


def decode_event(body: bytes, where: str, types: tuple[str, ...]) -> tuple[Envelope, Any]:
    """A stored bookkeeping event of one of `types` (registered; not an A2A message), checked:
    bounded depth, an envelope, its type, a valid payload (decoded into its struct).

    Raises:
        InvalidEnvelopeError: the body is not such an event (says where and why).
    """
    envelope = _envelope(body, where)
    if envelope.type not in types:
        expected = " or ".join(map(repr, types))
        raise InvalidEnvelopeError(
            where=where, path="$.type", reason=f"{envelope.type!r} is not {expected}"
        )
    try:
        payload = REGISTRY.decode(envelope.type, envelope.schema_version, envelope.data)
    except FuseError as error:
        raise InvalidEnvelopeError(where=where, path="$.data", reason=str(error)) from None
    return envelope, payload


def refused(body: bytes, where: str) -> tuple[Envelope, A2AMessage] | None:
    """Of a message `decode` refused for its protocol version, what addresses an error reply:
    its envelope and a stand-in message (type, sender, replyTo, context and task ids, no
    payload); None when even those are unreadable."""
    try:
        envelope = _envelope(body, where)
        probe = _PROBE.decode(envelope.data)
    except (FuseError, msgspec.ValidationError, msgspec.DecodeError):
        return None
    if not isinstance(probe.type, str) or not _is_type_name(probe.type):
        return None
    sender = probe.metadata.get("sender") if isinstance(probe.metadata, dict) else None
    stand_in = A2AMessage(
        type=probe.type,
        metadata=A2AMetadata(sender=_text(sender) or "unknown"),
        message_id=_text(probe.message_id),
        context_id=_text(probe.context_id),
        task_id=_text(probe.task_id),
        reply_to=_token(probe.reply_to),
    )
    return envelope, stand_in


def _envelope(body: bytes, where: str) -> Envelope:
    check_depth(body, where)
    try:
        return ENVELOPE_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        mapped = legacy.recognise(body, where)
        if mapped is None:
            raise InvalidEnvelopeError(where=where, path="$", reason=str(error)) from None
    return Envelope(
        id=mapped.id,
        stream=f"legacy.{mapped.shape}",
        type=MESSAGE_TYPE,
        version=1,
        timestamp=mapped.timestamp,
        trace=mapped.trace,
        metadata=mapped.metadata,
        data=msgspec.Raw(_ENCODER.encode(mapped.message)),
    )


def _protocol(
    data: msgspec.Raw, where: str, registry: SchemaRegistry, accepts: VersionRange
) -> ProtocolVersion | None:
    """The message's protocol version, checked; None when it states none (the current one)."""
    try:
        metadata = _VERSION_PROBE.decode(data).metadata
    except (msgspec.ValidationError, msgspec.DecodeError):
        metadata = None  # not an object, or metadata is not: decoding it says why
    stated = msgspec.UNSET if metadata is None else metadata.protocol_version
    try:
        version = accepts.check(
            str(current_protocol(registry)) if stated is msgspec.UNSET else stated
        )
    except ProtocolVersionError as error:
        raise ProtocolVersionError(
            version=error.version, reason=error.reason, where=where, accepted=str(accepts)
        ) from None
    if version.major != PROTOCOL_MAJOR:
        raise ProtocolVersionError(
            version=str(stated),
            reason=f"this runtime reads protocol {PROTOCOL_MAJOR}.x (current "
            f"{current_protocol(registry)}); no upcaster crosses a major version",
            where=where,
            accepted=str(accepts),
        )
    return None if stated is msgspec.UNSET else version


class _Probe(msgspec.Struct, frozen=True):
    """What addresses the error reply to a refused message, each field any JSON (checked)."""

    type: Any = None
    metadata: Any = None
    message_id: Any = msgspec.field(default=None, name="messageId")
    context_id: Any = msgspec.field(default=None, name="contextId")
    task_id: Any = msgspec.field(default=None, name="taskId")
    reply_to: Any = msgspec.field(default=None, name="replyTo")


_PROBE: Final = msgspec.json.Decoder(_Probe)


class _VersionMetadata(msgspec.Struct, frozen=True):
    protocol_version: Any = msgspec.UNSET


class _VersionProbe(msgspec.Struct, frozen=True):
    """Only `metadata.protocol_version`, read before the message's schema is chosen."""

    metadata: _VersionMetadata | None = None


_VERSION_PROBE: Final = msgspec.json.Decoder(_VersionProbe)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 256 else None


def _token(value: Any) -> str | None:
    text = _text(value)
    return text if text is not None and _is_token(text) else None


def _is_type_name(value: str) -> bool:
    """Whether `value` is a valid type name (the stand-in's type names its error reply)."""
    try:
        check_type_name(value)
    except InvalidNameError:
        return False
    return True


def _is_token(value: str) -> bool:
    """Whether `value` can be one subject token (a reply token becomes a subject)."""
    try:
        check_token(value, kind="reply token")
    except InvalidNameError:
        return False
    return True


def decode_stored(
    body: bytes, where: str, types: tuple[str, ...], registry: SchemaRegistry = REGISTRY
) -> tuple[Envelope, Any]:
    """A stored event of one of `types` on the message stream, checked: bounded depth, an
    envelope, one of those types, a payload valid for it.

    Raises:
        InvalidEnvelopeError: it is not one (says where and why).
    """
    check_depth(body, where)
    try:
        envelope = ENVELOPE_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise InvalidEnvelopeError(where=where, path="$", reason=str(error)) from None
    if envelope.type not in types:
        expected = " nor ".join(map(repr, types))
        reason = f"{envelope.type!r} is {'neither ' if len(types) > 1 else 'not '}{expected}"
        raise InvalidEnvelopeError(where=where, path="$.type", reason=reason)
    try:
        payload = registry.decode(envelope.type, envelope.schema_version, envelope.data)
    except FuseError as error:
        raise InvalidEnvelopeError(where=where, path="$.data", reason=str(error)) from None
    return envelope, payload
