"""Result aggregation as events: `aggregate.closed` (what a scatter/gather was built from) and
`aggregate.late` (a reply that came after it closed), both registered types."""

from __future__ import annotations

from typing import Literal

import msgspec

from newfuse.schemas.payloads import Timestamp, utcnow

Strategy = Literal["all", "first", "quorum", "deadline"]
Outcome = Literal["complete", "partial", "incomplete"]


class Asked(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One agent a task was scattered to, and the id of the request it was sent."""

    agent: str
    request_id: str = msgspec.field(name="requestId")


class AggregateClosed(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `aggregate.closed`: a gather ended.

    Attributes:
        aggregate_id: the aggregate's id (also the id of its subject).
        context_id: the conversation every request of it belongs to.
        message_type: what was asked.
        strategy: all, first, quorum (of `quorum`) or deadline.
        quorum: the replies a quorum needs.
        outcome: complete (the strategy was met), partial (the deadline passed with some
            replies) or incomplete (it cannot be, or was not, met in time).
        asked: each agent and its request id.
        answered: agents whose reply was used, in the order they came.
        failed: agents that answered with an error.
        missing: agents that had not answered when it closed.
        replies: the event ids of the replies it was built from (answered, then failed).
        timestamp: when it closed.
    """

    aggregate_id: str = msgspec.field(name="aggregateId")
    context_id: str = msgspec.field(name="contextId")
    message_type: str = msgspec.field(name="messageType")
    strategy: Strategy
    quorum: int | None = None
    outcome: Outcome
    asked: list[Asked] = []
    answered: list[str] = []
    failed: list[str] = []
    missing: list[str] = []
    replies: list[str] = []
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class AggregateLate(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `aggregate.late`: a reply to one of an aggregate's requests that came after
    the aggregate closed (stored, so not lost; not part of the aggregate).

    Attributes:
        aggregate_id: the aggregate it was late for.
        agent: who replied.
        request_id: the request it answers.
        reply: the reply's event id.
        ok: False when the reply is an error.
        timestamp: when it was recorded.
    """

    aggregate_id: str = msgspec.field(name="aggregateId")
    agent: str
    request_id: str = msgspec.field(name="requestId")
    reply: str
    ok: bool = True
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)
