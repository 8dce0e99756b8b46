"""An agent module for the registry tests: `fuse agents run beacon_agent:beacon` beats fast."""

from __future__ import annotations

from typing import Any

from newfuse.agents import Agent, Context
from newfuse.schemas import AgentProvider, AgentSkill

beacon = Agent(
    "beacon",
    version="3.1.0",
    name="Beacon",
    description="answers where it is",
    provider=AgentProvider(organization="Acme", url="https://acme.example"),
    skills=(AgentSkill(id="where", name="Where", description="says where", tags=["geo"]),),
    heartbeat=0.5,
)


@beacon.handler("where")
async def where(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    return {"here": str(ctx._runtime.agent_id)}


@beacon.handler("fail")
async def fail(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("asked to fail")
