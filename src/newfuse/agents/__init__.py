"""Agents on the log: the runtime (Agent, Context), addresses (AgentId), the client, A2A tasks
and dead letters."""

from newfuse.agents.address import AgentId
from newfuse.agents.client import AgentClient, Reply, TaskAnswer
from newfuse.agents.dead_letters import DeadLetters, Replayed, StoredDeadLetter
from newfuse.agents.runtime import Agent, Context, RunningAgent
from newfuse.agents.tasks import StatusChange, Task, Tasks, fold

__all__ = [
    "Agent",
    "AgentClient",
    "AgentId",
    "Context",
    "DeadLetters",
    "Replayed",
    "Reply",
    "RunningAgent",
    "StatusChange",
    "StoredDeadLetter",
    "Task",
    "TaskAnswer",
    "Tasks",
    "fold",
]
