"""Agents on the log: the runtime (Agent, Context), addresses (AgentId), the client, A2A tasks,
dead letters, the registry (cards, registration, heartbeats, who is live), and work queues
(priorities with aging, load-balanced workers)."""

from newfuse.agents.address import AgentId
from newfuse.agents.client import AgentClient, Reply, TaskAnswer
from newfuse.agents.dead_letters import DeadLetters, Replayed, StoredDeadLetter
from newfuse.agents.queues import (
    QueueStats,
    RunningWorker,
    TaskContext,
    TaskQueue,
    Worker,
    queue_stats,
)
from newfuse.agents.registry import (
    AgentSummary,
    Instance,
    Run,
    card_of,
    live_at,
    read_liveness,
    runs,
    summarize,
)
from newfuse.agents.runtime import Agent, Context, RunningAgent
from newfuse.agents.tasks import StatusChange, Task, Tasks, fold

__all__ = [
    "Agent",
    "AgentClient",
    "AgentId",
    "AgentSummary",
    "Context",
    "DeadLetters",
    "Instance",
    "QueueStats",
    "Replayed",
    "Reply",
    "Run",
    "RunningAgent",
    "RunningWorker",
    "StatusChange",
    "StoredDeadLetter",
    "Task",
    "TaskAnswer",
    "TaskContext",
    "TaskQueue",
    "Tasks",
    "Worker",
    "card_of",
    "fold",
    "live_at",
    "queue_stats",
    "read_liveness",
    "runs",
    "summarize",
]
