"""The envelope every event travels in, apart from its payload (`data`).

On the wire it is the UTF-8 JSON body of a NATS message on `<prefix>.ev.<category>.<id>`; the
global position is not in the body (it is the JetStream sequence, or the SQLite row's position).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from newfuse.schemas.certificate import Certified
from newfuse.schemas.ids import new_event_id
from newfuse.schemas.payloads import Timestamp

MAX_WIRE_INT = 2**63 - 1
"""Largest `version` or `schema_version` an envelope may carry (a signed 64-bit integer, what
SQLite and most languages' NATS clients hold without loss)."""

PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=MAX_WIRE_INT)]


class TraceContext(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """W3C trace context of the operation that produced the event."""

    traceparent: str
    tracestate: str | None = None


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """An event as stored: identity, place in its stream, lineage, and the payload's raw JSON.

    Attributes:
        id: event id (UUIDv7); also the `Nats-Msg-Id` header, so retries are deduplicated.
        stream: `<category>.<id>` of the stream the event belongs to.
        type: event type name, e.g. `a2a.message`.
        schema_version: version of the payload schema of `type`.
        version: 1-based position of the event within its stream.
        timestamp: when the writer created the event (UTC).
        correlation_id: id shared by every event of one conversation or saga.
        causation_id: id of the event (or command) that caused this one.
        trace: W3C trace context, when tracing.
        metadata: free-form string pairs (sender, tenant, ...).
        data: the payload, kept as raw JSON so that re-encoding is byte for byte.
    """

    id: str
    stream: str
    type: str
    schema_version: PositiveInt = 1
    version: PositiveInt
    timestamp: Timestamp
    correlation_id: str | None = None
    causation_id: str | None = None
    trace: TraceContext | None = None
    metadata: dict[str, str] = {}
    data: msgspec.Raw


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event to append. `type`/`schema_version` default to the registered ones of `data`.

    `data` is a registered payload struct, or any JSON-able value (a dict) with an explicit type.
    """

    data: Any
    type: str | None = None
    schema_version: int | None = None
    id: str = msgspec.field(default_factory=new_event_id)
    correlation_id: str | None = None
    causation_id: str | None = None
    trace: TraceContext | None = None
    metadata: dict[str, str] = {}


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An event read back from a store: its envelope, global position and decoded payload.

    `data` is the newest struct version of a registered type (older versions are upcast), or the
    raw JSON value when the type is not registered.

    Recorded events (and envelopes) are not tracked by Python's cyclic garbage collector
    (`gc=False`): replays allocate millions of them, and tracking cost about a tenth of read
    throughput. They are plain trees of decoded data; do not make `data` refer back to the event.

    When the payload's type declares sealed (personal, secret) fields, `envelope.data` and
    `data` hold them opened (decrypted); `redacted` lists the paths (`$.email`) of those that
    read as their replacement because their data subject's key is forgotten.

    `signer` is who signed the stored message, checked against the store's trusted admins
    (`newfuse.nats.signing`): None when the store checks no signatures (no Trust, or a backend
    whose writer is its owner, as SQLite's), or when the message is unsigned or its signature
    does not verify (the store reports that one as invalid and still delivers the event: it
    holds its place in its stream all the same).
    """

    position: int
    envelope: Envelope
    data: Any
    redacted: tuple[str, ...] = ()
    signer: Certified | None = None

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def stream(self) -> str:
        return self.envelope.stream

    @property
    def type(self) -> str:
        return self.envelope.type

    @property
    def schema_version(self) -> int:
        return self.envelope.schema_version

    @property
    def version(self) -> int:
        return self.envelope.version

    @property
    def timestamp(self) -> datetime:
        return self.envelope.timestamp

    @property
    def correlation_id(self) -> str | None:
        return self.envelope.correlation_id

    @property
    def causation_id(self) -> str | None:
        return self.envelope.causation_id

    @property
    def trace(self) -> TraceContext | None:
        return self.envelope.trace

    @property
    def metadata(self) -> dict[str, str]:
        return self.envelope.metadata

    @property
    def category(self) -> str:
        return self.envelope.stream.partition(".")[0]

    def to_wire(self) -> dict[str, Any]:
        """The event as on the wire (envelope with its payload) plus `position`."""
        wire: dict[str, Any] = msgspec.json.decode(ENVELOPE_ENCODER.encode(self.envelope))
        wire["position"] = self.position
        if self.redacted:
            wire["redacted"] = list(self.redacted)
        return wire


ENVELOPE_ENCODER = msgspec.json.Encoder()
ENVELOPE_DECODER = msgspec.json.Decoder(Envelope)
