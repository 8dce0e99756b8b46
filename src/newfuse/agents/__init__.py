"""Agents on the log: the runtime (Agent, Context), addresses (AgentId), the client, A2A tasks,
dead letters, the registry (cards, registration, heartbeats, who is live), work queues
(priorities with aging, load-balanced workers), result aggregation, circuit events."""

from newfuse.agents.address import AgentId
from newfuse.agents.aggregate import AggregateRecord, Aggregates, Aggregator, Gathered
from newfuse.agents.circuits import CircuitEvents, circuit_stream
from newfuse.agents.client import AgentClient, Reply, TaskAnswer, UnclaimedReply
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
from newfuse.agents.replay import CallComparison, EffectComparison, Replay, ReplayedMessage
from newfuse.agents.runtime import Agent, Context, RunningAgent
from newfuse.agents.tasks import StatusChange, Task, Tasks, fold

__all__ = [
    "Agent",
    "AgentClient",
    "AgentId",
    "AgentSummary",
    "AggregateRecord",
    "Aggregates",
    "Aggregator",
    "CallComparison",
    "CircuitEvents",
    "Context",
    "DeadLetters",
    "EffectComparison",
    "Gathered",
    "Instance",
    "QueueStats",
    "Replay",
    "Replayed",
    "ReplayedMessage",
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
    "UnclaimedReply",
    "Worker",
    "card_of",
    "circuit_stream",
    "fold",
    "live_at",
    "queue_stats",
    "read_liveness",
    "runs",
    "summarize",
]
