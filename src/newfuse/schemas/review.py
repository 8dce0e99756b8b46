"""Review and feedback events: a human review of one saga step is a stream `review.<id>`, and
feedback on an agent's result a stream `feedback.<message id>` (core/review.py, core/feedback.py).

Every review event is appended with the stream's expected version, so of two reviewers who
decide at once one decision is stored; the other's append conflicts and it reads who decided.
Each event names its saga (`sagaId`) so an orchestrator following the `review` category knows
whose saga to wake without reading the review first.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from newfuse.schemas.payloads import Timestamp, utcnow

OnDeadline = Literal["reject", "escalate"]


class ReviewRequested(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `review.requested`: step `step` of saga `sagaId` waits for a person. `action` is
    what will run when approved (the saga's name and step), `input` the input proposed for it;
    someone of `groups` decides by `deadline`, after which the review is rejected
    (`onDeadline` reject) or handed to `escalateTo` for `escalateSeconds` more (escalate)."""

    review_id: str = msgspec.field(name="reviewId")
    saga_id: str = msgspec.field(name="sagaId")
    step: str
    summary: str
    action: str
    input: dict[str, Any] = {}
    groups: list[str]
    deadline: Timestamp
    on_deadline: OnDeadline = msgspec.field(name="onDeadline", default="reject")
    escalate_to: list[str] = msgspec.field(name="escalateTo", default_factory=list)
    escalate_seconds: float = msgspec.field(name="escalateSeconds", default=0.0)
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class ReviewClaimed(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `review.claimed`: reviewer `by` took the review (no one else may decide it)."""

    review_id: str = msgspec.field(name="reviewId")
    saga_id: str = msgspec.field(name="sagaId")
    by: str
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class ReviewInputEdited(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `review.input_edited`: reviewer `by` replaced the proposed input with `input`
    (what the step runs with if approved)."""

    review_id: str = msgspec.field(name="reviewId")
    saga_id: str = msgspec.field(name="sagaId")
    by: str
    input: dict[str, Any] = {}
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class ReviewApproved(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `review.approved`: reviewer `by` approved; the step runs with the review's input."""

    review_id: str = msgspec.field(name="reviewId")
    saga_id: str = msgspec.field(name="sagaId")
    by: str
    comment: str = ""
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class ReviewRejected(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `review.rejected`: reviewer `by` rejected (`comment` says why); the step fails for
    good and the saga compensates."""

    review_id: str = msgspec.field(name="reviewId")
    saga_id: str = msgspec.field(name="sagaId")
    by: str
    comment: str
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class ReviewEscalated(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `review.escalated`: the deadline passed undecided; now `groups` decide, by
    `deadline` (a claim before is void). A second deadline rejects."""

    review_id: str = msgspec.field(name="reviewId")
    saga_id: str = msgspec.field(name="sagaId")
    groups: list[str]
    deadline: Timestamp
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class ReviewExpired(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `review.expired`: the deadline passed undecided and the review is rejected."""

    review_id: str = msgspec.field(name="reviewId")
    saga_id: str = msgspec.field(name="sagaId")
    deadline: Timestamp
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class ModelVersion(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Which model produced a result, as its `model.invoked` record names it."""

    provider: str
    request_model: str = msgspec.field(name="requestModel")
    response_model: str | None = msgspec.field(name="responseModel", default=None)
    revision: str | None = None
    params_hash: str = msgspec.field(name="paramsHash", default="")
    call: int = 0


class FeedbackGiven(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `feedback.given`: `by` scored (`score`, -10 to 10) and commented the result of
    handling message `messageId`; `model` is the model version that produced it, when that
    handling recorded a `model.invoked` (the last call's), and `agent` the agent that did."""

    message_id: str = msgspec.field(name="messageId")
    by: str
    score: int
    comment: str = ""
    agent: str | None = None
    model: ModelVersion | None = None
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


ReviewEvent = (
    ReviewRequested
    | ReviewClaimed
    | ReviewInputEdited
    | ReviewApproved
    | ReviewRejected
    | ReviewEscalated
    | ReviewExpired
)

REVIEW_TYPES: Final[dict[str, type[msgspec.Struct]]] = {
    "review.requested": ReviewRequested,
    "review.claimed": ReviewClaimed,
    "review.input_edited": ReviewInputEdited,
    "review.approved": ReviewApproved,
    "review.rejected": ReviewRejected,
    "review.escalated": ReviewEscalated,
    "review.expired": ReviewExpired,
    "feedback.given": FeedbackGiven,
}
"""The review and feedback event types and their payloads (version 1 each)."""
