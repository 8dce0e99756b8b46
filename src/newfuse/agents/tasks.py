"""A2A tasks as a fold: their events on `<prefix>.a2a._task.<task_id>`, the Task, a reader.

A queued task's events are on `<prefix>.a2a._task.<queue>.<submitter>.<task_id>` instead
(agents/queues.py), so that nats-server can scope who writes and reads them.

A task's events are one subject of the message stream, so its history is read with one
filtered direct get. Two types live there: `task.status` (a TaskStatusUpdate: the agent moved
the task, with what it said and produced) and `a2a.message` (a message the task received, as the
handler that took it up recorded it). The task is their fold. The rules are the A2A spec's
(1.0, "Task lifecycle"): a terminal state (completed, canceled, failed, rejected) is final, so
any event after it is reported and ignored, never raised; `submitted` is only where a task
starts. Everything else read there is treated as hostile: a body that is not such an event, or
one that names another task, is reported with its position and skipped.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterable
from datetime import datetime
from typing import Final, NamedTuple

import msgspec
from nats.aio.client import Client

from newfuse.agents import wire
from newfuse.errors import FuseError
from newfuse.nats import headers
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.subjects import Subjects
from newfuse.schemas import (
    TERMINAL_STATES,
    A2AMessage,
    Artifact,
    Envelope,
    TaskState,
    TaskStatusUpdate,
    default_registry,
)

log = logging.getLogger("newfuse.agents")

STATUS_TYPE: Final = "task.status"
"""Envelope type of a status change on a task's subject."""
MESSAGE_TYPE: Final = "a2a.message"
"""Envelope type of a message the task received, recorded on its subject."""
SENDER: Final = "sender"
"""Envelope metadata key naming the agent (`type/key`) that wrote a task event."""

_REGISTRY: Final = default_registry()

TASK_STATES: Final[tuple[str, ...]] = typing.get_args(TaskState)
"""Every A2A task state, in the spec's order."""


def task_id_for(message_id: str, consumer: str) -> str:
    """The id of the task a message starts when its handler moves it and it has no `taskId`:
    derived from the message and the consumer that took it (a topic's message can start one
    task per subscribing type), so every redelivery moves the same task."""
    return wire.derived_id(message_id, consumer, "task")


class TaskEvent(NamedTuple):
    """One checked event of a task: where it is stored, its envelope and its payload."""

    position: int
    envelope: Envelope
    payload: TaskStatusUpdate | A2AMessage


class StatusChange(msgspec.Struct, frozen=True, kw_only=True):
    """One state a task went through: the event's id and position, who moved it, and when."""

    id: str
    state: TaskState
    position: int
    timestamp: datetime
    sender: str | None = None
    message: A2AMessage | None = None


class Task(msgspec.Struct, kw_only=True):
    """An A2A task as the fold of its events.

    Attributes:
        id: the task id (A2A `Task.id`).
        context_id: the conversation (A2A `contextId`).
        state: the current state.
        agent: who set the latest status (`type/key`): where an answer to it goes.
        created, updated: envelope times of the first and the last event applied.
        statuses: every status change applied, in order.
        history: the messages of the task (what it received and what the agent said), in order.
        artifacts: what it produced; a later artifact with the same id replaces the earlier.
        ignored: events read and not applied, each with its position and why.
        position: the stream sequence of the last event applied.
    """

    id: str
    context_id: str | None
    state: TaskState
    agent: str | None = None
    created: datetime
    updated: datetime
    statuses: list[StatusChange] = []
    history: list[A2AMessage] = []
    artifacts: list[Artifact] = []
    ignored: list[str] = []
    position: int = 0

    @property
    def question(self) -> StatusChange | None:
        """The status change the task waits on, when it is input-required."""
        if self.state != "input-required" or not self.statuses:
            return None
        return self.statuses[-1]


def decode_task_event(body: bytes, *, position: int, subject: str) -> TaskEvent:
    """A stored task event, checked: bounded depth, an envelope, a known type, a valid payload.

    Raises:
        InvalidEnvelopeError: it is not a task event (says where and why).
    """
    where = f"at position {position} on {subject}"
    envelope, payload = wire.decode_stored(body, where, (STATUS_TYPE, MESSAGE_TYPE), _REGISTRY)
    return TaskEvent(position, envelope, payload)


def refusal(task: Task | None, state: str) -> str | None:
    """Why `task` may not move to `state` (A2A lifecycle), or None when it may."""
    if task is None:
        return None
    if task.state in TERMINAL_STATES:
        return f"the task is {task.state}, a terminal state: A2A allows no change after it"
    if state == "submitted" and task.statuses:
        return f"the task is {task.state}; a task is submitted once, where it starts"
    return None


class TaskFold:
    """Applies a task's events one by one; `task` is the fold so far (None before any)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.task: Task | None = None
        self._ignored: list[str] = []
        self._messages: set[str] = set()

    def skip(self, position: int, reason: str) -> None:
        """Report an event that is not applied (logged, and kept in the task's `ignored`)."""
        note = f"position {position}: {reason}"
        log.warning("task %s: ignored the event at %s", self.task_id, note)
        self._ignored.append(note)
        if self.task is not None:
            self.task.ignored = list(self._ignored)

    def apply(self, event: TaskEvent) -> None:
        """Fold one event in; one that breaks the rules is reported and skipped."""
        payload, envelope, position = event.payload, event.envelope, event.position
        if payload.task_id != self.task_id:
            self.skip(position, f"it names task {payload.task_id!r}, not this one")
            return
        task = self.task
        if task is not None and payload.context_id not in (None, task.context_id):
            self.skip(
                position,
                f"its context {payload.context_id!r} is not the task's {task.context_id!r}",
            )
            return
        if isinstance(payload, TaskStatusUpdate):
            why, what = refusal(task, payload.state), f"status {payload.state!r}"
        else:  # a message joins a task that has not ended (or starts one)
            why, what = refusal(task, "working"), "a message"
        if why is not None:
            self.skip(position, f"{what} refused: {why}")
            return
        if task is None:
            task = self.task = Task(
                id=self.task_id,
                context_id=payload.context_id,
                state="submitted",
                created=envelope.timestamp,
                updated=envelope.timestamp,
                ignored=list(self._ignored),
            )
        task.updated = envelope.timestamp
        task.position = position
        if isinstance(payload, A2AMessage):
            self._remember(task, payload)
            return
        sender = envelope.metadata.get(SENDER) or (
            payload.message.metadata.sender if payload.message is not None else None
        )
        task.statuses.append(
            StatusChange(
                id=envelope.id,
                state=payload.state,
                position=position,
                timestamp=payload.timestamp,
                sender=sender,
                message=payload.message,
            )
        )
        task.state = payload.state
        task.agent = sender
        if payload.message is not None:
            self._remember(task, payload.message)
        for artifact in payload.artifacts:
            index = next(
                (i for i, a in enumerate(task.artifacts) if a.artifact_id == artifact.artifact_id),
                None,
            )
            if index is None:
                task.artifacts.append(artifact)
            else:
                task.artifacts[index] = artifact

    def _remember(self, task: Task, message: A2AMessage) -> None:
        key = message.message_id
        if key is not None:
            if key in self._messages:
                return  # the same message recorded twice (a foreign writer): history once
            self._messages.add(key)
        task.history.append(message)


def fold(task_id: str, events: Iterable[TaskEvent]) -> Task | None:
    """The task that `events` (its events, in stream order) make; None when they make none."""
    folder = TaskFold(task_id)
    for event in events:
        folder.apply(event)
    return folder.task


async def read_task(
    direct: DirectGet, subjects: Subjects, task_id: str, subject: str | None = None
) -> Task | None:
    """The fold of one task's subject (`subject`, default the task's own A2A subject; a filter
    such as `Subjects.any_queued_task_events` finds a queued task), read by direct get; None
    when nothing is stored there.

    Raises:
        InvalidNameError: `task_id` cannot be a subject token.
        StoreUnavailableError: the stream did not answer.
    """
    subject = subject or subjects.task_events(task_id)
    folder = TaskFold(task_id)
    async for msg in direct.messages(subject, f"read task {task_id!r}"):
        _apply_raw(folder, msg.data, sequence_of(msg), subject)
    return folder.task


async def read_last_status(direct: DirectGet, subject: str, task_id: str) -> Task | None:
    """The task as its last event on `subject` makes it (one direct get by subject: what an
    identity that may read only its own subjects can do): its state, the last status's message
    and artifacts, one entry in `statuses`; None when nothing is stored there."""
    last = await direct.last_for(subject, f"read the status of task {task_id!r}")
    if last is None:
        return None
    folder = TaskFold(task_id)
    _apply_raw(folder, last.data, sequence_of(last), subject)
    return folder.task


def _apply_raw(folder: TaskFold, body: bytes, position: int, subject: str) -> None:
    try:
        event = decode_task_event(body, position=position, subject=subject)
    except FuseError as error:
        folder.skip(position, f"not a task event: {error}")
        return
    folder.apply(event)


class Tasks:
    """Reads tasks from the message stream of `prefix` (folds, never writes).

    `skipped` lists what the last `all` could not place in any task.
    """

    def __init__(self, nc: Client, *, prefix: str = "fuse", timeout: float = 5.0) -> None:
        self.subjects = Subjects(prefix)
        self._direct = DirectGet(nc, self.subjects.message_stream_name, timeout=timeout)
        self.skipped: list[str] = []

    async def get(self, task_id: str) -> Task | None:
        """One task (an agent's, or else a queued one), or None when it has no events."""
        task = await read_task(self._direct, self.subjects, task_id)
        if task is None:
            subject = self.subjects.any_queued_task_events(task_id)
            task = await read_task(self._direct, self.subjects, task_id, subject)
        return task

    async def all(self, *, state: str | None = None) -> list[Task]:
        """Every task, queued or not (in `state` only, if given), oldest first."""
        folds: dict[str, TaskFold] = {}
        self.skipped = []
        async for msg in self._direct.messages(self.subjects.all_task_events, "list the tasks"):
            subject = (msg.headers or {}).get(headers.SUBJECT, "")
            task_id = subject.rpartition(".")[2]
            if not subject or not task_id:
                self.skipped.append(f"position {sequence_of(msg)}: no subject in the answer")
                continue
            folder = folds.get(subject)  # by subject: one id may be a task of two queues
            if folder is None:
                folder = folds[subject] = TaskFold(task_id)
            _apply_raw(folder, msg.data, sequence_of(msg), subject)
        tasks = [f.task for f in folds.values() if f.task is not None]
        self.skipped.extend(note for f in folds.values() if f.task is None for note in f._ignored)
        return [t for t in tasks if state is None or t.state == state]
