"""Feedback on an agent's result: a score and a comment, an event `feedback.given` on the
stream `feedback.<message id>`, linked to the message and, when its handling called a model,
to the model version that produced the result.

The model version comes from the `model.invoked` records of that handling (their
`correlation` is the handled message's id; the last call's is taken, the one that made the
answer). Finding them reads the model records by direct get (`ModelCalls`): a scan of the
records, fine for a person's feedback, not meant for bulk scoring. A message whose handling
recorded no model call gets feedback without a model. The message itself is not looked up:
feedback may come for a message of another system, and its id is all the link needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from newfuse.errors import ReviewInputError
from newfuse.eventstore import ANY, EventStore
from newfuse.schemas import FeedbackGiven, ModelVersion, NewEvent, check_token

if TYPE_CHECKING:
    from newfuse.agents.models.usage import ModelCalls

CATEGORY = "feedback"
SCORES = range(-10, 11)
"""Scores a feedback may give: -10 to 10 (thumbs are -1 and 1, stars 1 to 5)."""
MAX_COMMENT = 4096


def feedback_stream(message_id: str) -> str:
    """The stream of the feedback on one message's result: `feedback.<message id>`."""
    return f"{CATEGORY}.{check_token(message_id, kind='message id')}"


async def model_of(calls: ModelCalls, message_id: str) -> tuple[str | None, ModelVersion] | None:
    """The agent and the model version of the last model call made while handling
    `message_id` (None when its handling recorded none)."""
    found = None
    async for stored in calls.records():
        invoked = stored.invoked
        if invoked.correlation != message_id:
            continue
        if found is None or invoked.call >= found.call:
            found = invoked
    if found is None:
        return None
    return found.agent, msgspec.convert(found, ModelVersion, from_attributes=True)


def check_feedback(message_id: str, *, score: int, by: str, comment: str = "") -> None:
    """Refuse feedback that cannot be stored, before anything is read or written.

    Raises:
        ReviewInputError: the score is not a whole number from -10 to 10, the comment is too
            long, or no name is given.
        InvalidNameError: `message_id` cannot be a stream id.
    """
    if isinstance(score, bool) or not isinstance(score, int) or score not in SCORES:
        raise ReviewInputError(
            what="the score", reason=f"a whole number from -10 to 10, not {score!r}"
        )
    if len(comment) > MAX_COMMENT:
        raise ReviewInputError(
            what="the comment", reason=f"{len(comment)} characters, over {MAX_COMMENT}"
        )
    if not by.strip():
        raise ReviewInputError(what="the reviewer", reason="feedback says who gave it")
    feedback_stream(message_id)


async def give_feedback(
    store: EventStore,
    message_id: str,
    *,
    score: int,
    by: str,
    comment: str = "",
    model: ModelVersion | None = None,
    agent: str | None = None,
) -> FeedbackGiven:
    """Append `by`'s feedback on the result of handling `message_id`; the event stored.

    Raises:
        ReviewInputError, InvalidNameError: see `check_feedback`.
    """
    check_feedback(message_id, score=score, by=by, comment=comment)
    given = FeedbackGiven(
        message_id=message_id, by=by, score=score, comment=comment, agent=agent, model=model
    )
    await store.append(
        feedback_stream(message_id), NewEvent(data=given, correlation_id=message_id), ANY
    )
    return given


async def read_feedback(store: EventStore, message_id: str) -> list[FeedbackGiven]:
    """Every feedback given on `message_id`'s result, oldest first (foreign bodies skipped)."""
    return [
        event.data
        async for event in store.read(feedback_stream(message_id))
        if isinstance(event.data, FeedbackGiven)
    ]
