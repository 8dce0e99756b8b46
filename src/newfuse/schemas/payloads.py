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


class A2AMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A message from one agent to another (type `a2a.message`)."""

    type: str
    payload: dict[str, Any] = {}
    metadata: A2AMetadata


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
