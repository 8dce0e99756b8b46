"""Built-in payloads: the seed's A2A message, state update and transaction shapes.

Payloads are frozen, keyword-only structs. A new field gets a default; a field is never retyped
or reordered; a breaking change is a new schema version plus an upcaster (see registry.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
"""A timezone-aware datetime: naive values are rejected on decode (JSON Schema `date-time`)."""


def utcnow() -> datetime:
    """The current time in UTC (payload timestamps are always timezone-aware)."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """`moment` in UTC; a naive datetime is taken to be UTC already (never local time)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class A2AMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """Who sent an A2A message, when, and in which protocol version."""

    timestamp: Timestamp = msgspec.field(default_factory=utcnow)
    sender: str
    protocol_version: str = "1.0"


Role = Literal["user", "agent"]
"""Who wrote an A2A message: the client side (`user`) or the agent answering (`agent`)."""


class Part(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One piece of an A2A message's content: exactly one of text, structured data, or a file
    reference (A2A 1.0 `Part`: `text` / `data` / `url`, with `filename` and `mediaType`)."""

    text: str | None = None
    data: Any = None
    url: str | None = None
    filename: str | None = None
    media_type: str | None = msgspec.field(default=None, name="mediaType")
    metadata: dict[str, Any] = {}

    def __post_init__(self) -> None:
        given = [name for name in ("text", "data", "url") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a part holds exactly one of text, data or url (a file reference); got "
                f"{', '.join(given) or 'none'}"
            )


class A2AMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A message from one agent to another (type `a2a.message`).

    The seed's shape `{type, payload, metadata}` plus the A2A message fields, all optional so
    that seed messages stay valid: `messageId`, `contextId` (the conversation), `taskId`,
    `role`, `parts`; and the runtime's request/reply fields `replyTo` (where the reply goes)
    and `inReplyTo` (the message id a reply answers). `type` selects the handler; `payload` is
    the handler's typed argument.
    """

    type: str
    payload: dict[str, Any] = {}
    metadata: A2AMetadata
    message_id: str | None = msgspec.field(default=None, name="messageId")
    context_id: str | None = msgspec.field(default=None, name="contextId")
    task_id: str | None = msgspec.field(default=None, name="taskId")
    role: Role | None = None
    parts: list[Part] = []
    reply_to: str | None = msgspec.field(default=None, name="replyTo")
    in_reply_to: str | None = msgspec.field(default=None, name="inReplyTo")


class StateUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """A new state of an agent (type `agent.state_update`); `version` orders updates."""

    agent_id: str = msgspec.field(name="agentId")
    state: dict[str, Any] = {}
    version: int
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


TransactionStatus = Literal["active", "committed", "rolled_back"]


class Transaction(msgspec.Struct, frozen=True, kw_only=True):
    """A unit of work across agents and its status (type `transaction`)."""

    id: str
    operations: list[dict[str, Any]] = []
    status: TransactionStatus = "active"
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)
