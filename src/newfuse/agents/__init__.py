"""Agents on the log: the runtime (Agent, Context), addresses (AgentId) and the client."""

from newfuse.agents.address import AgentId
from newfuse.agents.client import AgentClient, Reply
from newfuse.agents.runtime import Agent, Context, RunningAgent

__all__ = ["Agent", "AgentClient", "AgentId", "Context", "Reply", "RunningAgent"]
