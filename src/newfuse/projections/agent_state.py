"""The built-in agent state read model (Redis): one hash per agent with its state, version,
updated-at and lifecycle status, folded from StateUpdate and agent lifecycle events.

A StateUpdate whose version is not newer than the stored one is ignored; the comparison and the
write happen in one Lua script inside the batch's MULTI, so no interleaving can reorder them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import msgspec

from newfuse.projections.base import Projection, encode_json
from newfuse.projections.redis_model import RedisBatch, RedisReadModel
from newfuse.schemas import RecordedEvent, StateUpdate

NAME: Final = "agent_state"
STATE_UPDATE: Final = "agent.state_update"
LIFECYCLE: Final[dict[str, str]] = {
    "agent.registered": "registered",
    "agent.started": "running",
    "agent.stopped": "stopped",
    "agent.failed": "failed",
    "agent.deregistered": "deregistered",
}
"""Lifecycle event types and the status each one sets. Their payload names the agent with
`agentId` (or `agent_id`); otherwise the id of an `agent.<id>` stream is used."""

_APPLY_STATE = """
local stored = redis.call('HGET', KEYS[1], 'version')
if stored and tonumber(stored) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'agent_id', ARGV[1], 'version', ARGV[2], 'state', ARGV[3],
  'updated_at', ARGV[4], 'position', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

_READ = """
local generation = redis.call('GET', KEYS[1])
if not generation then return {} end
local prefix = ARGV[1] .. generation .. ':m:'
local ids
if ARGV[2] == '' then
  ids = redis.call('SMEMBERS', prefix .. 'agents')
else
  ids = {ARGV[2]}
end
local out = {}
for _, id in ipairs(ids) do
  local fields = redis.call('HGETALL', prefix .. 'agent:' .. id)
  if #fields > 0 then table.insert(out, fields) end
end
return out
"""


class AgentState(msgspec.Struct, frozen=True, kw_only=True):
    """What the read model knows of one agent.

    Attributes:
        agent_id: the agent.
        state: its latest state (from the StateUpdate with the highest version).
        version: that StateUpdate's version (0 before any).
        updated_at: that StateUpdate's timestamp.
        status: its lifecycle status (`registered`, `running`, ...), if any event set one.
        status_at: when the status was set.
        position: the position of the last event that changed this record.
    """

    agent_id: str
    state: dict[str, Any] = {}
    version: int = 0
    updated_at: datetime | None = None
    status: str | None = None
    status_at: datetime | None = None
    position: int = 0


def _agent_of(event: RecordedEvent) -> str | None:
    data = event.data
    if isinstance(data, dict):
        for field in ("agentId", "agent_id"):
            if isinstance(data.get(field), str):
                return str(data[field])
    category, _, ident = event.stream.partition(".")
    return ident if category == "agent" else None


def agent_state_projection() -> Projection[RedisBatch]:
    """The `agent_state` projection: StateUpdate (newer versions only) and lifecycle events."""
    projection: Projection[RedisBatch] = Projection(NAME)

    @projection.on(STATE_UPDATE)
    def _state(event: RecordedEvent, batch: RedisBatch) -> None:
        update = event.data
        if not isinstance(update, StateUpdate):  # a dict, or a newer version's struct
            update = msgspec.convert(update, StateUpdate, from_attributes=True)
        batch.eval(
            _APPLY_STATE,
            [batch.key("agent", update.agent_id), batch.key("agents")],
            [
                update.agent_id,
                update.version,
                encode_json(update.state),
                update.timestamp.isoformat(),
                event.position,
            ],
        )

    @projection.on(*LIFECYCLE)
    def _lifecycle(event: RecordedEvent, batch: RedisBatch) -> None:
        agent = _agent_of(event)
        if agent is None:
            return
        batch.hset(
            batch.key("agent", agent),
            {
                "agent_id": agent,
                "status": LIFECYCLE[event.type],
                "status_at": event.timestamp.isoformat(),
                "position": event.position,
            },
        )
        batch.sadd(batch.key("agents"), agent)

    return projection


def _record(flat: list[str]) -> AgentState:
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return AgentState(
        agent_id=fields["agent_id"],
        state=msgspec.json.decode(fields["state"]) if "state" in fields else {},
        version=int(fields.get("version", 0)),
        updated_at=datetime.fromisoformat(fields["updated_at"]) if "updated_at" in fields else None,
        status=fields.get("status"),
        status_at=datetime.fromisoformat(fields["status_at"]) if "status_at" in fields else None,
        position=int(fields.get("position", 0)),
    )


class AgentStateView:
    """Reads the agent state model; each call resolves the active generation atomically.

    Example:
        view = AgentStateView(model)
        state = await view.get("researcher-1")
    """

    def __init__(self, model: RedisReadModel, *, name: str = NAME) -> None:
        self.model = model
        self.name = name

    async def get(self, agent_id: str) -> AgentState | None:
        """The state of one agent, or None if no event named it."""
        if not agent_id:
            return None  # "" asks the read script for every agent
        rows = await self.model.read_active(self.name, _READ, agent_id)
        return _record(rows[0]) if rows else None

    async def agents(self) -> list[AgentState]:
        """Every agent's state, by agent id, from one generation."""
        rows = await self.model.read_active(self.name, _READ, "")
        return sorted((_record(row) for row in rows), key=lambda state: state.agent_id)
