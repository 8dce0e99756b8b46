"""Lag and status of projections: checkpoint against the store's head, rate, dead letters."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from newfuse.errors import UnknownProjectionError
from newfuse.eventstore import EventStore
from newfuse.projections.base import ReadModel
from newfuse.schemas import utcnow


class ProjectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where a projection stands.

    Attributes:
        name: the projection.
        generation: its active generation.
        state: what its runner last reported (`running`, `waiting`, `stopped`, `failed`), or
            `not running` when no runner ever reported.
        checkpoint: the last position applied to the active generation.
        head: the store's newest position.
        lag_events: head minus checkpoint.
        lag_seconds: how long the oldest unapplied event has waited (0 without lag).
        events_per_second: the runner's last reported rate.
        dead_letters: dead letters in the active generation.
        last_error: the last error the runner met (a poison event, an outage), if any.
        reported_at: when the runner last reported.
    """

    name: str
    generation: int | None
    state: str
    checkpoint: int
    head: int
    lag_events: int
    lag_seconds: float
    events_per_second: float
    dead_letters: int
    last_error: str | None
    reported_at: datetime | None


async def projection_status(
    name: str, store: EventStore, model: ReadModel[Any], *, live: Any = None
) -> ProjectionStatus:
    """The status of projection `name` held in `model`, measured against `store`.

    Args:
        name: the projection.
        store: the event store it reads.
        model: the read model holding it.
        live: a ProjectionRunner of it in this process, whose in-memory stats are fresher.

    Raises:
        UnknownProjectionError: `model` holds no projection of that name.
    """
    generation = await model.active_generation(name)
    if generation is None:
        raise UnknownProjectionError(name=name, known=await model.projections())
    checkpoint = await model.checkpoint(name, generation)
    head = await store.head_position()
    lag = max(head - checkpoint, 0)
    lag_seconds = 0.0
    if lag:
        async for event in store.read_all(checkpoint + 1, limit=1):
            lag_seconds = max((utcnow() - event.timestamp).total_seconds(), 0.0)
    stats = live.stats() if live is not None else await model.read_stats(name)
    dead = await model.dead_letters(name, generation)
    return ProjectionStatus(
        name=name,
        generation=generation,
        state=stats.state if stats else "not running",
        checkpoint=checkpoint,
        head=head,
        lag_events=lag,
        lag_seconds=round(lag_seconds, 3),
        events_per_second=stats.events_per_second if stats else 0.0,
        dead_letters=len(dead),
        last_error=stats.last_error if stats else None,
        reported_at=stats.updated_at if stats else None,
    )


async def projection_statuses(store: EventStore, model: ReadModel[Any]) -> list[ProjectionStatus]:
    """The status of every projection `model` holds, by name."""
    return [await projection_status(name, store, model) for name in await model.projections()]
