"""The events the projection benchmarks append, and what their baselines write per event."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC
from typing import Any

import msgspec
from _harness import progress

from newfuse.eventstore import NO_STREAM, EventStore
from newfuse.schemas import Envelope, NewEvent, RecordedEvent, StateUpdate

REBUILD_BATCH = 1000
"""Events per atomic unit in `rebuild` (its default) and per pipeline/transaction in the
baselines, so both sides make the same number of round trips to the read model."""


def agent_of(stream_index: int) -> str:
    return f"bench-{stream_index}"


def new_event(agent: str, version: int) -> NewEvent:
    """A typed StateUpdate of about 200 bytes; `version` is the event's version in its stream,
    so every update is newer than the stored one and the agent-state script always writes."""
    return NewEvent(
        data=StateUpdate(
            agent_id=agent,
            state={"step": "plan", "turn": version, "note": "n" * 100},
            version=version,
        ),
        correlation_id=f"conv-{version % 100}",
    )


async def populate(store: EventStore, total: int, agents: int) -> int:
    """Append `total` StateUpdates, one stream `agent.bench-<k>` per agent, in batched appends
    (up to 500 events per append, 8 appenders in flight); returns the head position."""
    per = total // agents
    batch = min(per, 500)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(agents):
        queue.put_nowait(index)
    done = 0
    next_report = time.monotonic() + 5

    async def worker() -> None:
        nonlocal done, next_report
        while not queue.empty():
            index = queue.get_nowait()
            agent = agent_of(index)
            written = 0
            while written < per:
                chunk = [
                    new_event(agent, written + i + 1) for i in range(min(batch, per - written))
                ]
                await store.append(f"agent.{agent}", chunk, written if written else NO_STREAM)
                written += len(chunk)
                done += len(chunk)
            if time.monotonic() > next_report:
                progress(f"  populated {done:,}/{total:,}")
                next_report = time.monotonic() + 5

    await asyncio.gather(*(worker() for _ in range(8)))
    return await store.head_position()


def hset_fields(update: StateUpdate, position: int) -> dict[str, Any]:
    return {
        "agent_id": update.agent_id,
        "version": update.version,
        "state": msgspec.json.encode(update.state).decode(),
        "updated_at": update.timestamp.isoformat(),
        "position": position,
    }


AUDIT_TABLE = (
    "CREATE TABLE events (position INTEGER PRIMARY KEY, time TEXT NOT NULL, "
    "stream TEXT NOT NULL, category TEXT NOT NULL, type TEXT NOT NULL, "
    "schema_version INTEGER NOT NULL, event_id TEXT NOT NULL, sender TEXT, agent TEXT, "
    "correlation_id TEXT, causation_id TEXT, trace_id TEXT, payload TEXT NOT NULL)"
)
AUDIT_INDEXES = (
    ("time", "time"),
    ("stream", "stream, position"),
    ("type", "type, position"),
    ("sender", "sender, position"),
    ("agent", "agent, position"),
    ("correlation", "correlation_id, position"),
    ("trace", "trace_id"),
)


def audit_row(event: RecordedEvent) -> tuple[Any, ...]:
    """The 13 values the audit index stores for an event (these events have no sender/trace)."""
    envelope: Envelope = event.envelope
    category, _, ident = envelope.stream.partition(".")
    return (
        event.position,
        envelope.timestamp.astimezone(UTC).replace(tzinfo=None).isoformat("T", "microseconds")
        + "Z",
        envelope.stream,
        category,
        envelope.type,
        envelope.schema_version,
        envelope.id,
        envelope.metadata.get("sender"),
        ident if category == "agent" else envelope.metadata.get("sender"),
        envelope.correlation_id,
        envelope.causation_id,
        None,
        bytes(envelope.data).decode(),
    )
