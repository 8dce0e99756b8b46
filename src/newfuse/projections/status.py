"""Lag and status of projections: checkpoint against the store's head, rate, dead letters."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from newfuse.errors import ReadModelUnavailableError, UnknownProjectionError
from newfuse.eventstore import EventStore
from newfuse.projections.base import Projection, ReadModel
from newfuse.schemas import utcnow


class ProjectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where a projection stands.

    Attributes:
        name: the projection.
        generation: its active generation.
        state: what its runner last reported (`running`, `waiting`, `stopped`, `failed`),
            `not running` when no runner ever reported, or `unavailable` when its read model
            does not answer (then `last_error` says why, and what only the model knows is None).
        checkpoint: the last position applied to the active generation.
        head: the store's newest position.
        lag_events: head minus checkpoint.
        lag_seconds: how long the oldest unapplied event has waited (0 without lag).
        events_per_second: the runner's last reported rate.
        dead_letters: dead letters in the active generation.
        last_error: the error that holds the projection up (a poison event that stopped it, an
            outage it waits out); None once its runner runs again.
        reported_at: when the runner last reported.
        server: the server its runner's consumer sits on (JetStream; the consumer's leader on a
            cluster), None when no runner reads or the store has no servers.
    """

    name: str
    generation: int | None
    state: str
    checkpoint: int | None
    head: int
    lag_events: int | None
    lag_seconds: float | None
    events_per_second: float
    dead_letters: int
    last_error: str | None
    reported_at: datetime | None
    server: str | None = None


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
    server = (await store.subscribers()).get(f"projection {name}")
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
        # a runner that runs again has left its last outage behind (it reports that error
        # with its stats until then)
        last_error=stats.last_error if stats and stats.state != "running" else None,
        reported_at=stats.updated_at if stats else None,
        server=server,
    )


async def projection_statuses(store: EventStore, model: ReadModel[Any]) -> list[ProjectionStatus]:
    """The status of every projection `model` holds, by name."""
    return [await projection_status(name, store, model) for name in await model.projections()]


async def prepared_status(
    projection: Projection[Any], store: EventStore, model: ReadModel[Any], *, live: Any = None
) -> ProjectionStatus:
    """The status of `projection` (set up in `model` if new); a model that does not answer
    gives a row in state `unavailable` that says why, so one model down hides no other row."""
    try:
        await model.prepare(projection)
        return await projection_status(projection.name, store, model, live=live)
    except ReadModelUnavailableError as error:
        return ProjectionStatus(
            name=projection.name,
            generation=None,
            state="unavailable",
            checkpoint=None,
            head=await store.head_position(),
            lag_events=None,
            lag_seconds=None,
            events_per_second=0.0,
            dead_letters=0,
            last_error=str(error),
            reported_at=None,
        )
