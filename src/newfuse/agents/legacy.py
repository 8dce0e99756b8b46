"""The New Fuse's two legacy message shapes (V1 flat, V2 header/body), recognised and mapped.

A foreign client may publish raw JSON of either shape to `<prefix>.a2a.<type>` instead of an
envelope. `recognise` maps such a body, checked field by field, onto what an envelope would
carry: the message id, a timestamp, a trace, string metadata and an A2A message in wire form.
The README's "Legacy message shapes" table is the contract; this module implements it.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

import msgspec

from newfuse.errors import InvalidEnvelopeError, InvalidNameError
from newfuse.schemas import Timestamp, TraceContext, check_type_name

LEGACY_TYPES: Final[dict[str, str]] = {
    "TASK_REQUEST": "task.request",
    "QUERY": "query",
    "RESPONSE": "response",
    "NOTIFICATION": "notification",
    "ERROR": "error",
    "HEARTBEAT": "heartbeat",
    "CAPABILITY_DISCOVERY": "capability.discovery",
    "WORKFLOW_STEP": "workflow.step",
}
"""The New Fuse's message type names and the message types they become (any other valid type
name is kept as it is)."""

_NAMESPACE: Final = uuid.UUID("0b0e9f42-6d1c-5c2e-8f7a-3d9e4c1a5b60")
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_W3C_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_MISSING = re.compile(r"Object missing required field `([^`]*)`")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS_MAX: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Word = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_IN_RANGE = msgspec.Meta(ge=0, le=_MS_MAX)
Millis = Annotated[int, _IN_RANGE] | Annotated[float, _IN_RANGE]
"""Milliseconds since the Unix epoch (The New Fuse's `timestamp`, `sent_at`, `timeout`)."""
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
When = Millis | Timestamp


class _V1Metadata(msgspec.Struct, frozen=True, kw_only=True):
    priority: Word | None = None
    timeout: Millis | None = None
    retry_count: Count | None = msgspec.field(default=None, name="retryCount")
    protocol_version: Any = msgspec.UNSET  # checked as a protocol version, with its own error


class V1Message(msgspec.Struct, frozen=True, kw_only=True):
    """The flat shape: `{id, type, timestamp, sender, recipient, payload, metadata}`."""

    id: Any = None  # any JSON: a bad id is replaced by a derived one, not refused
    type: Text
    timestamp: When
    sender: Text
    recipient: Text | None = None
    payload: Any = None
    metadata: _V1Metadata = msgspec.field(default_factory=_V1Metadata)


class _V2Header(msgspec.Struct, frozen=True, kw_only=True):
    id: Any = None
    type: Text
    version: Word
    priority: Word | None = None
    source: Text
    target: Text | None = None


class _V2Metadata(msgspec.Struct, frozen=True, kw_only=True):
    sent_at: When
    timeout: Millis | None = None
    retries: Count | None = None
    trace_id: Text | None = None


class _V2Body(msgspec.Struct, frozen=True, kw_only=True):
    content: Any = None
    metadata: _V2Metadata


class V2Message(msgspec.Struct, frozen=True, kw_only=True):
    """The header/body shape: `{header {id, type, version, ...}, body {content, metadata}}`."""

    header: _V2Header
    body: _V2Body


Shape = Literal["v1", "v2"]


class Recognised(msgspec.Struct, frozen=True, kw_only=True):
    """A legacy body mapped: what the envelope gets, and the A2A message (wire form)."""

    shape: Shape
    id: str
    timestamp: datetime
    trace: TraceContext | None
    metadata: dict[str, str]
    message: dict[str, Any]


_JSON: Final = msgspec.json.Decoder()


def shape_of(value: Any) -> Shape | None:
    """Which legacy shape a decoded body has, or None (then it is not a legacy message).

    V2: an object with `header` and `body`; V1: an object with `sender` or `payload`. Either
    without the envelope's `stream` and `data`, so a broken envelope is reported as one.
    """
    if not isinstance(value, dict) or "stream" in value or "data" in value:
        return None
    if "header" in value and "body" in value:
        return "v2"
    if "sender" in value or "payload" in value:
        return "v1"
    return None


def recognise(body: bytes, where: str) -> Recognised | None:
    """A legacy V1 or V2 body mapped (see the README table), or None if it is neither shape.

    The body's nesting depth must have been checked already (wire.decode does).

    Raises:
        InvalidEnvelopeError: it has a legacy shape but a field is missing, of the wrong type,
            out of bounds, or its type is not a type name; the error names the field.
    """
    try:
        value = _JSON.decode(body)
    except msgspec.DecodeError:
        return None
    shape = shape_of(value)
    if shape is None:
        return None
    label = f"legacy {shape.upper()} message"
    try:
        if shape == "v1":
            return _from_v1(msgspec.convert(value, V1Message, strict=True), body, where, label)
        return _from_v2(msgspec.convert(value, V2Message, strict=True), body, where, label)
    except msgspec.ValidationError as error:
        text = str(error)
        path = text.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in text else "$"
        missing = _MISSING.match(text)
        if missing:  # msgspec names the object lacking the field: name the field itself
            path = f"{path}.{missing.group(1)}"
        raise InvalidEnvelopeError(where=where, path=path, reason=f"{label}: {text}") from None


def _from_v1(v1: V1Message, body: bytes, where: str, label: str) -> Recognised:
    meta = v1.metadata
    return _recognised(
        "v1",
        given_id=v1.id,
        body=body,
        message_type=_type(v1.type, where, label),
        payload=v1.payload,
        sender=v1.sender,
        when=v1.timestamp,
        protocol_version=meta.protocol_version,
        trace_id=None,
        extra={
            "legacy.recipient": v1.recipient,
            "legacy.priority": meta.priority,
            "legacy.timeout_ms": meta.timeout,
            "legacy.retries": meta.retry_count,
        },
    )


def _from_v2(v2: V2Message, body: bytes, where: str, label: str) -> Recognised:
    header, meta = v2.header, v2.body.metadata
    return _recognised(
        "v2",
        given_id=header.id,
        body=body,
        message_type=_type(header.type, where, label),
        payload=v2.body.content,
        sender=header.source,
        when=meta.sent_at,
        # header.version versions the V2 shape, not the A2A protocol: the mapped message is
        # protocol 1.0 (the README says why).
        protocol_version=msgspec.UNSET,
        trace_id=meta.trace_id,
        extra={
            "legacy.version": header.version,
            "legacy.target": header.target,
            "legacy.priority": header.priority,
            "legacy.timeout_ms": meta.timeout,
            "legacy.retries": meta.retries,
            "legacy.trace_id": meta.trace_id,
        },
    )


def _recognised(
    shape: Shape,
    *,
    given_id: Any,
    body: bytes,
    message_type: str,
    payload: Any,
    sender: str,
    when: int | float | datetime,
    protocol_version: Any,
    trace_id: str | None,
    extra: dict[str, Any],
) -> Recognised:
    message_id = _message_id(given_id, body)
    timestamp = _moment(when)
    metadata: dict[str, Any] = {"timestamp": timestamp.isoformat(), "sender": sender}
    if protocol_version is not msgspec.UNSET:  # null too: refused like any non-version
        metadata["protocol_version"] = protocol_version
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        payload = {"value": payload}
    replaced = given_id if message_id != given_id else None
    return Recognised(
        shape=shape,
        id=message_id,
        timestamp=timestamp,
        trace=None if trace_id is None else _trace(trace_id, message_id),
        metadata=_strings({"legacy.shape": shape, "legacy.id": replaced, **extra}),
        message={
            "type": message_type,
            "payload": payload,
            "metadata": metadata,
            "messageId": message_id,
        },
    )


def _type(name: str, where: str, label: str) -> str:
    mapped = LEGACY_TYPES.get(name)
    if mapped is not None:
        return mapped
    try:
        return check_type_name(name)
    except InvalidNameError as error:
        raise InvalidEnvelopeError(
            where=where,
            path="$.type" if label.endswith("V1 message") else "$.header.type",
            reason=f"{label}: {error} (known legacy types: {', '.join(LEGACY_TYPES)})",
        ) from None


def _message_id(given: Any, body: bytes) -> str:
    """The legacy id when it is a sane token, else a UUIDv5 of it (or of the body when there
    is none): the same on every redelivery, so effects stay keyed to the message."""
    if isinstance(given, str) and _SANE_ID.fullmatch(given):
        return given
    if given is None:
        return str(uuid.uuid5(_NAMESPACE, hashlib.sha256(body).hexdigest()))
    return str(uuid.uuid5(_NAMESPACE, msgspec.json.encode(given).decode()))


def _moment(value: int | float | datetime) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return _EPOCH + timedelta(milliseconds=value)


def _trace(trace_id: str, message_id: str) -> TraceContext:
    """A W3C traceparent carrying `trace_id` (32 lowercase hex, not all zeros) or, for any
    other text, a trace id derived from it, so messages that share a trace_id share a trace;
    the parent span id is derived from the message id."""
    if _W3C_TRACE_ID.fullmatch(trace_id) and trace_id != "0" * 32:
        trace = trace_id
    else:
        trace = uuid.uuid5(_NAMESPACE, f"trace/{trace_id}").hex
    span = uuid.uuid5(_NAMESPACE, f"span/{message_id}").hex[:16]
    return TraceContext(traceparent=f"00-{trace}-{span}-01")


def _strings(values: dict[str, Any]) -> dict[str, str]:
    """Envelope metadata: each value as text (JSON for non-strings), at most 256 characters."""
    shown: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        shown[key] = text if len(text) <= 256 else text[:253] + "..."
    return shown
