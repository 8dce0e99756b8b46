"""NATS header names of the wire contract, one constant each (values are always strings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

MSG_ID: Final[str] = "Nats-Msg-Id"
"""The event id; JetStream drops a second message with the same id inside the duplicate window."""

TYPE: Final[str] = "Fuse-Type"
"""The event type name, e.g. `agent.state_update` (also in the body as `type`)."""

SCHEMA_VERSION: Final[str] = "Fuse-Schema-Version"
"""The payload's schema version as a decimal string (also in the body as `schema_version`)."""

STREAM_VERSION: Final[str] = "Fuse-Stream-Version"
"""The event's 1-based version within its stream (the body's `version` is authoritative)."""

EXPECTED_LAST_SUBJECT_SEQUENCE: Final[str] = "Nats-Expected-Last-Subject-Sequence"
"""Optimistic concurrency: the server stores the message only if the last message on its subject
has this stream sequence (0: the subject has no message). Error 10071 otherwise."""

BATCH_ID: Final[str] = "Nats-Batch-Id"
"""Atomic batch publish (ADR-50): the id shared by every message of one batch."""

BATCH_SEQUENCE: Final[str] = "Nats-Batch-Sequence"
"""Atomic batch publish (ADR-50): 1-based position of the message in its batch, without gaps."""

BATCH_COMMIT: Final[str] = "Nats-Batch-Commit"
"""Atomic batch publish (ADR-50): `1` on the last message; the server stores all or nothing."""

SCHEDULE: Final[str] = "Nats-Schedule"
"""Message scheduling (ADR-51, nats-server >= 2.12): `@at <RFC 3339 time>` makes the message a
schedule that the server fires once, at that time, into `Nats-Schedule-Target`."""

SCHEDULE_TARGET: Final[str] = "Nats-Schedule-Target"
"""Message scheduling (ADR-51): the subject, in the same stream and not the schedule's own, that a
fired schedule is stored on (error 10190 otherwise)."""

SCHEDULE_TTL: Final[str] = "Nats-Schedule-TTL"
"""Message scheduling (ADR-51): the `Nats-TTL` the fired message gets (needs allow_msg_ttl; at
least 1 s, error 10191 otherwise)."""

SCHEDULER: Final[str] = "Nats-Scheduler"
"""Set by the server on a fired message: the subject of the schedule that fired it."""

SCHEDULE_NEXT: Final[str] = "Nats-Schedule-Next"
"""Set by the server on a fired message: when the schedule fires next, `purge` for an `@at` one
(its schedule message is removed)."""

TTL: Final[str] = "Nats-TTL"
"""Per-message TTL (ADR-43, nats-server >= 2.11, stream allow_msg_ttl): seconds or a Go duration,
at least 1 s; the server removes the message once it is that old."""

TRACEPARENT: Final[str] = "traceparent"
"""W3C trace context: the producing span (https://www.w3.org/TR/trace-context/)."""

TRACESTATE: Final[str] = "tracestate"
"""W3C trace context: vendor-specific trace state."""

STATUS: Final[str] = "Status"
"""Set by nats-py on a server status message (e.g. `404`, `204` end of batch, `100` control)."""

DESCRIPTION: Final[str] = "Description"
"""Set by nats-py on a server status message: the status text (`EOB`, `Idle Heartbeat`, ...)."""

NUM_PENDING: Final[str] = "Nats-Num-Pending"
"""Direct get (ADR-31): how many matching messages remain after this batch."""

SEQUENCE: Final[str] = "Nats-Sequence"
"""Direct get (ADR-31): the stream sequence of the returned message."""

SUBJECT: Final[str] = "Nats-Subject"
"""Direct get (ADR-31): the subject of the returned message."""

TIME_STAMP: Final[str] = "Nats-Time-Stamp"
"""Direct get (ADR-31): when the server stored the message (RFC 3339)."""

LAST_CONSUMER: Final[str] = "Nats-Last-Consumer"
"""Idle heartbeat of a push consumer: the consumer sequence of the last message it delivered."""

CONSUMER_STALLED: Final[str] = "Nats-Consumer-Stalled"
"""Idle heartbeat of a push consumer waiting for a flow-control reply: where to send it."""

PENDING_MESSAGES: Final[str] = "Nats-Pending-Messages"
"""Pull request status (ADR-37): how many messages of the request were left undelivered."""


def message_size(body: bytes, headers: Mapping[str, str]) -> int:
    """Bytes a message counts against the server's `max_payload`: the body plus the header
    block (`NATS/1.0\\r\\n`, `Name: value\\r\\n` per header, `\\r\\n`), as the server counts.

    nats-py compares only the body with `max_payload`; a message the server finds larger makes
    it close the connection ("Maximum Payload Violation") for every caller sharing it.
    """
    size = len(body) + 12
    for name, value in headers.items():
        size += len(name) + 4 + (len(value) if value.isascii() else len(value.encode()))
    return size
