"""A2A task states and status events, agent lifecycle events and dead letters (registered types).

Task states are the A2A protocol's (spec 1.0 `TaskState`, lower-case with dashes as in its JSON):
terminal states end a task, interrupted states wait for the client (a human's answer, a login).
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from newfuse.schemas.card import AgentCard
from newfuse.schemas.payloads import A2AMessage, Part, Timestamp, utcnow

TaskState = Literal[
    "submitted",
    "working",
    "input-required",
    "auth-required",
    "completed",
    "canceled",
    "failed",
    "rejected",
]

TERMINAL_STATES: Final[frozenset[str]] = frozenset({"completed", "canceled", "failed", "rejected"})
"""A task in one of these states never changes again (A2A spec: terminal)."""

INTERRUPTED_STATES: Final[frozenset[str]] = frozenset({"input-required", "auth-required"})
"""A task in one of these states waits for the client (A2A spec: interrupted)."""


class Artifact(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Something a task produced (A2A `Artifact`)."""

    artifact_id: str = msgspec.field(name="artifactId")
    name: str | None = None
    description: str | None = None
    parts: list[Part] = []


class TaskStatusUpdate(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A task moved to `state` (type `task.status`); the task's state is the fold of these.

    `message` is what the agent said with the change (the question of an input-required task,
    the answer of a completed one); `artifacts` what it produced.
    """

    task_id: str = msgspec.field(name="taskId")
    context_id: str | None = msgspec.field(default=None, name="contextId")
    state: TaskState
    message: A2AMessage | None = None
    artifacts: list[Artifact] = []
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class AgentLifecycle(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An agent instance registered, started, beat, stopped, failed or deregistered.

    Types `agent.registered`, `agent.started`, `agent.heartbeat`, `agent.stopped`,
    `agent.failed`, `agent.deregistered` share this payload. `agentId` is `<type>-<key>` (what
    the agent-state projection keys on; without it, the id of the `agent.<id>` stream the event
    is in); `instance` tells instances of one type apart. Every field is optional, so the
    lifecycle events written before these types were registered stay valid.
    """

    agent_id: str | None = msgspec.field(default=None, name="agentId")
    agent_type: str | None = msgspec.field(default=None, name="agentType")
    key: str | None = None
    instance: str | None = None
    reason: str | None = None
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


class AgentRegistered(AgentLifecycle, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `agent.registered`: the instance's card (what it is, accepts, where it is)."""

    card: AgentCard | None = None


class AgentStarted(AgentLifecycle, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `agent.started`."""


AgentState = Literal["running", "stopped"]


class AgentHeartbeat(AgentLifecycle, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `agent.heartbeat`: an instance is alive (or, `state` stopped, has stopped).

    The runtime keeps the last one per instance on the liveness stream, not in the log; `interval`
    is the seconds between beats (what healthy and stale are measured in), `started` when the
    instance started, `name` and `version` its card's.
    """

    name: str | None = None
    version: str | None = None
    state: AgentState | None = None
    interval: float | None = None
    started: Timestamp | None = None


class AgentStopped(AgentLifecycle, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `agent.stopped`."""


class AgentFailed(AgentLifecycle, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `agent.failed` (`reason` says why)."""


class AgentDeregistered(AgentLifecycle, frozen=True, kw_only=True, omit_defaults=True):
    """Payload of `agent.deregistered`."""


LIFECYCLE_TYPES: Final[dict[str, type[AgentLifecycle]]] = {
    "agent.registered": AgentRegistered,
    "agent.started": AgentStarted,
    "agent.heartbeat": AgentHeartbeat,
    "agent.stopped": AgentStopped,
    "agent.failed": AgentFailed,
    "agent.deregistered": AgentDeregistered,
}
"""Lifecycle type names (those the agent-state projection recognises) and their payloads."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A message an agent gave up on (type `agent.dead_letter`), with why.

    `position` is the message's JetStream sequence on the A2A stream, `subject` where it was
    delivered, `attempts` how often it was delivered, `error` the last failure.
    """

    consumer: str
    subject: str
    position: int
    message_id: str | None = msgspec.field(default=None, name="messageId")
    message_type: str | None = msgspec.field(default=None, name="messageType")
    attempts: int
    error: str
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)
