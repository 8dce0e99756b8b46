"""Work queues on the bus: priorities 0-9 with aging, load-balanced workers, cancel, deadlines.

A task is an A2A task (agents/tasks.py) whose work waits on `<prefix>.task.<queue>.<priority>`
of the message stream. `TaskQueue.submit` stores the task's `submitted` status (with the task's
message) on its task subject, then the message on the queue's subject, with its terms (queue,
priority, deadline, max attempts, submitter) in the envelope's metadata.

A queued task's subject is `<prefix>.a2a._task.<queue>.<submitter>.<task_id>`: the submitter
is the identity (`fuse auth`) the submitting connection has, `anonymous` without one. Both are
tokens so that nats-server can scope them: a queue's worker identity writes and reads its
queue's tasks only, a submitting agent its own. A worker stores a task's statuses under the
submitter that signed it where it trusts signatures (a task that names another submitter
changes nothing of that one's), else under the one its terms name. (A task submitted without
a submitter term, by an older client, keeps the task's own subject `<prefix>.a2a._task.<id>`.)

Workers of a queue are instances of the agent type `task-<queue>` and share one durable pull
consumer per priority, `task-<queue>-p<N>`: JetStream hands each message to one of them at a
time (competing consumers), and a worker pulls only what it has room for (at most
`max(2, concurrency)` per priority ahead), so a faster worker asks more often and takes more.
Delivery, retries with backoff, dead letters and exactly-once effects are the agent runtime's
(agents/runtime.py); this module adds the order in which a worker takes what it pulled and the
task's lifecycle around the handler.

Order: a worker takes the highest priority that has a task waiting, except that a lower
priority's first task that has waited `aging` seconds at the head of its lane (on this worker)
goes first (the longest-waiting such head first). So under a flood of higher priorities, a
task that is first of its priority starts within `aging` + the longest handler run (+ the
pull's delivery), and a backlog of a lower priority drains at one task per `aging` per worker
at least. Aging reorders; it adds no capacity.

Lifecycle (A2A states): submitted (by the submitter) -> working (stored before the handler
runs, one per attempt) -> completed (the handler's return value is the `result` artifact) or
failed (the last attempt's error, with a dead letter; or a deadline) or canceled (by
`TaskQueue.cancel`). A canceled task still queued is skipped; a running one is cancelled at
once (its handler gets an asyncio cancellation and `ctx.cancelled` is true) and what it emitted
is dropped. A task past its deadline is not started (failed, "deadline passed"); a running one
is cancelled at its deadline and fails the same way; neither is retried nor dead-lettered.

Sealed fields (agents/sealing.py): a payload struct's `Personal()` / `Secret()` fields are
sealed by the key service in `submit`, once, before the status or the message is stored; a
worker's delivery is opened by the runtime as an agent's, within the task's attempts. A
handler's result is a status's artifact, which is not sealed: a struct with sealed fields
there fails the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from newfuse.agents import sealing, wire
from newfuse.agents.address import AgentId, check_agent_name
from newfuse.agents.registry import DEFAULT_HEARTBEAT, read_liveness
from newfuse.agents.runtime import (
    Agent,
    Context,
    Effect,
    RunningAgent,
    _as_payload,
    _Route,
    _Sender,
    run_handler,
)
from newfuse.agents.tasks import (
    SENDER,
    STATUS_TYPE,
    Task,
    decode_task_event,
    read_last_status,
    read_task,
)
from newfuse.errors import (
    AgentConfigError,
    FuseError,
    InvalidNameError,
    InvalidPayloadError,
    StoreNotFoundError,
    TaskAttemptsError,
    TaskNotFoundError,
    TaskQueueUnknownError,
    TaskSubmitError,
    TaskWaitTimeoutError,
)
from newfuse.eventstore import EventStore
from newfuse.nats import headers
from newfuse.nats.connection import identity_of, reads_own_subjects_only
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.durable import DurableSpec
from newfuse.nats.jsapi import API, api_error, api_request
from newfuse.nats.jserrors import WrongLastSequenceError, decode_pub_ack
from newfuse.nats.provision import MessageStreamSpec, ensure_event_stream
from newfuse.nats.publish import PubAckInbox
from newfuse.nats.signing import trust_of
from newfuse.nats.subjects import Subjects
from newfuse.schemas import (
    MAX_STREAM_ID_BYTES,
    TERMINAL_STATES,
    A2AMessage,
    A2AMetadata,
    Artifact,
    Envelope,
    Part,
    TaskStatusUpdate,
    check_token,
    check_type_name,
    new_event_id,
)
from newfuse.security.key_service import KeyServiceClient

log = logging.getLogger("newfuse.agents")

PRIORITIES: Final = range(10)
"""Task priorities: 0 (lowest, the default) to 9 (highest)."""
MAX_ATTEMPTS: Final = 10
"""The most attempts a task may ask for (its queue's consumers redeliver one more time)."""
TASK_MESSAGE_TYPE: Final = "queue.task"
"""The A2A message type of a task's message on a queue subject."""
RESULT_ARTIFACT: Final = "result"
"""The artifact id of a completed task's result."""

# Envelope metadata keys of a queued task's terms.
QUEUE_KEY: Final = "queue"
PRIORITY_KEY: Final = "priority"
DEADLINE_KEY: Final = "deadline"
ATTEMPTS_KEY: Final = "max_attempts"
KIND_KEY: Final = "kind"
"""What kind of work the task is (`submit(kind=)`): what a worker's `accepts` policy checks."""
SUBMITTER_KEY: Final = "submitter"
"""The submitter token of the task's subject (`<prefix>.a2a._task.<queue>.<submitter>.<id>`)."""
ANONYMOUS: Final = "anonymous"
"""The submitter token of a connection without an identity."""
STATUS_SEQ_KEY: Final = "status_seq"
"""The sequence of the task's `submitted` status: the first attempt stores `working` expecting
it as the task subject's last (JetStream's expected last subject sequence), so a cancel stored
in between is found without a read."""
_MAX_TERM = 64  # characters of one term's value: anything longer is not ours
_KNOWN_TASKS = 10_000  # the subjects of the newest tasks a TaskQueue submitted, remembered
_PRIORITY_NAMES: Final = frozenset(str(p) for p in PRIORITIES)


def check_queue(queue: str) -> str:
    """A queue name: one subject token that can also name a consumer (InvalidNameError)."""
    return check_agent_name(queue, kind="task queue")


def worker_type(queue: str) -> str:
    """The agent type of a queue's workers (what `fuse agents list` shows)."""
    return f"task-{queue}"


def consumer_name(queue: str, priority: int) -> str:
    """The durable consumer a queue's workers share at one priority: `task-<queue>-p<N>`."""
    return f"task-{queue}-p{priority}"


def queue_consumers(
    queue: str,
    subjects: Subjects,
    *,
    ack_wait: float = 30.0,
    max_deliver: int = MAX_ATTEMPTS + 1,
) -> list[DurableSpec]:
    """The durable consumers a queue's workers share, the highest priority first (what
    `provision` makes for a worker identity: a default Worker's settings)."""
    return [
        DurableSpec(
            stream=subjects.message_stream_name,
            name=consumer_name(queue, priority),
            filter_subjects=(subjects.task(queue, priority),),
            ack_wait=ack_wait,
            max_deliver=max_deliver,
        )
        for priority in reversed(PRIORITIES)
    ]


class TaskTerms(msgspec.Struct, frozen=True, kw_only=True):
    """What a queued task asks of its worker (from its envelope's metadata)."""

    queue: str
    priority: int
    deadline: datetime | None = None
    max_attempts: int | None = None
    status_seq: int | None = None
    kind: str | None = None
    submitter: str | None = None


def terms_of(metadata: dict[str, str], where: str) -> TaskTerms:
    """A queued task's terms, checked (they come off the bus: bounded, typed, in range).

    Raises:
        InvalidPayloadError: a term is missing or out of range (says which and why).
    """

    def bad(key: str, reason: str) -> InvalidPayloadError:
        return InvalidPayloadError(
            type_name=TASK_MESSAGE_TYPE,
            version=1,
            path=f"$.metadata.{key}",
            reason=f"{reason} ({where})",
        )

    keys = (QUEUE_KEY, PRIORITY_KEY, DEADLINE_KEY, ATTEMPTS_KEY, STATUS_SEQ_KEY, KIND_KEY)
    for key in (*keys, SUBMITTER_KEY):
        value = metadata.get(key)
        if value is not None and len(value) > _MAX_TERM:
            raise bad(key, f"longer than {_MAX_TERM} characters")
    queue = metadata.get(QUEUE_KEY)
    if queue is None:
        raise bad(QUEUE_KEY, "missing: a task names its queue")
    priority = metadata.get(PRIORITY_KEY, "0")
    if priority not in _PRIORITY_NAMES:
        raise bad(PRIORITY_KEY, f"{priority!r} is not a priority 0-9")
    deadline = None
    if (text := metadata.get(DEADLINE_KEY)) is not None:
        try:
            deadline = datetime.fromisoformat(text)
        except ValueError:
            raise bad(DEADLINE_KEY, f"{text!r} is not an RFC 3339 time") from None
        if deadline.tzinfo is None:
            raise bad(DEADLINE_KEY, f"{text!r} has no time zone")
    attempts = None
    if (text := metadata.get(ATTEMPTS_KEY)) is not None:
        if not text.isdigit() or not 1 <= int(text) <= MAX_ATTEMPTS:
            raise bad(ATTEMPTS_KEY, f"{text!r} is not a number of attempts 1-{MAX_ATTEMPTS}")
        attempts = int(text)
    seq = metadata.get(STATUS_SEQ_KEY)
    if seq is not None and not (seq.isdigit() and seq.isascii()):
        raise bad(STATUS_SEQ_KEY, f"{seq!r} is not a stream sequence")
    kind = metadata.get(KIND_KEY)
    if kind is not None:
        try:
            check_type_name(kind)
        except InvalidNameError as error:
            raise bad(KIND_KEY, str(error)) from None
    submitter = metadata.get(SUBMITTER_KEY)
    if submitter is not None:
        try:
            check_token(submitter, kind="task submitter")
        except InvalidNameError as error:
            raise bad(SUBMITTER_KEY, str(error)) from None
    return TaskTerms(
        queue=queue,
        priority=int(priority),
        deadline=deadline,
        max_attempts=attempts,
        status_seq=int(seq) if seq is not None else None,
        kind=kind,
        submitter=submitter,
    )


def kind_of(metadata: dict[str, str]) -> str:
    """The kind of a queued task as its worker's policy checks it: its `kind` term (cut to
    `_MAX_TERM` characters and marked so, when longer: no policy names that), else the type
    it travels as, `queue.task`."""
    kind = metadata.get(KIND_KEY)
    if kind is None:
        return TASK_MESSAGE_TYPE
    return kind if len(kind) <= _MAX_TERM else f"{kind[:_MAX_TERM]}... ({len(kind)} characters)"


def _status(
    task_id: str,
    context_id: str | None,
    state: Any,
    *,
    event_id: str,
    sender: str,
    message: A2AMessage | None = None,
    causation_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A status event of a task, encoded for its task subject."""
    update = TaskStatusUpdate(task_id=task_id, context_id=context_id, state=state, message=message)
    return wire.encode(
        f"task.{task_id}",
        STATUS_TYPE,
        update,
        event_id=event_id,
        correlation_id=context_id,
        causation_id=causation_id,
        trace=wire.current_trace(),  # the worker's span while it runs; the submitter's, if any
        metadata={SENDER: sender},
    )


def result_artifacts(result: Any) -> list[Artifact]:
    """A handler's return value as the task's artifacts (None: none; text: a text part; anything
    else: a data part).

    Raises:
        InvalidPayloadError: `result`'s struct declares sealed fields: a status is not sealed,
            so they would be stored in the clear.
    """
    if sealing.plan_of(result) is not None:
        raise InvalidPayloadError(
            type_name=STATUS_TYPE,
            version=1,
            path="$.artifacts",
            reason=f"{type(result).__qualname__} has sealed fields, and a task's result is "
            "not sealed: return what may be stored in the clear, send the rest in a message",
        )
    if result is None:
        return []
    if isinstance(result, str):
        part = Part(text=result)
    else:
        part = Part(data=msgspec.to_builtins(result))
    return [Artifact(artifact_id=RESULT_ARTIFACT, name=RESULT_ARTIFACT, parts=[part])]


# -- submitting ----------------------------------------------------------------------------------


class TaskQueue:
    """Submits, cancels and reads queued tasks (an async context manager over a connection).

    Example:
        >>> async with TaskQueue(nc) as queue:
        ...     task_id = await queue.submit("resize", {"image": "a.png"}, priority=7)
        ...     task = await queue.wait(task_id, timeout=30)

    Its tasks' subjects name the identity of `nc` as their submitter (`anonymous` without
    one). On a connection that may read only its own subjects (an agent identity's), a task is
    read from its last status (one entry in `statuses`), and one this TaskQueue did not submit
    is found by its queue (`queue=`).
    """

    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = "fuse",
        stream: MessageStreamSpec | None = None,
        sender: str = "client",
        timeout: float = 5.0,
    ) -> None:
        self.subjects = Subjects(prefix)
        self.sender = sender
        self._nc = nc
        self._stream = stream or MessageStreamSpec(subjects=self.subjects)
        self._timeout = timeout
        self.submitter = identity_of(nc) or ANONYMOUS
        """The submitter token of the tasks it submits (the connection's identity)."""
        self._scoped = reads_own_subjects_only(nc)
        self._known: OrderedDict[str, str] = OrderedDict()  # task id -> subject, the newest
        self._pubacks = PubAckInbox(nc, f"task queue client {sender!r}")
        self._direct = DirectGet(nc, self.subjects.message_stream_name, timeout=timeout)
        self._keys = KeyServiceClient(
            nc, prefix=prefix, requester=identity_of(nc) or sender, timeout=timeout
        )

    async def __aenter__(self) -> TaskQueue:
        await ensure_event_stream(self._nc, self._stream)
        await self._pubacks.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the PubAck inbox. Idempotent."""
        await self._pubacks.close()

    async def _store(self, subject: str, body: bytes, wire_headers: dict[str, str]) -> int:
        answer = await self._pubacks.request(subject, body, wire_headers, self._timeout)
        return decode_pub_ack(answer, subject=subject).seq

    def _subject(self, task_id: str, queue: str | None) -> str:
        """The subject of a task, or a filter that finds it (TaskQueueUnknownError: its queue
        is needed and unknown)."""
        known = self._known.get(task_id)  # one it submitted: its subject
        if known is not None:
            return known
        if self._scoped:  # it reads by subject, and only its own tasks'
            if queue is None:
                raise TaskQueueUnknownError(task_id=task_id, identity=self.submitter)
            return self.subjects.queued_task_events(check_queue(queue), self.submitter, task_id)
        if queue is not None:
            check_queue(queue)
        return self.subjects.any_queued_task_events(task_id, queue)

    async def _read(self, task_id: str, queue: str | None) -> tuple[Task | None, str]:
        subject = self._subject(task_id, queue)
        if self._scoped:
            return await read_last_status(self._direct, subject, task_id), subject
        return await read_task(self._direct, self.subjects, task_id, subject), subject

    def _remember(self, task_id: str, subject: str) -> None:
        self._known[task_id] = subject
        self._known.move_to_end(task_id)
        while len(self._known) > _KNOWN_TASKS:
            self._known.popitem(last=False)

    async def submit(
        self,
        queue: str,
        payload: Any = None,
        *,
        priority: int = 0,
        deadline: datetime | float | None = None,
        max_attempts: int | None = None,
        task_id: str | None = None,
        context_id: str | None = None,
        parts: list[Part] | None = None,
        kind: str | None = None,
    ) -> str:
        """Queue a task; returns its id (`task_id`, or a new UUIDv7).

        Args:
            queue: the queue's name.
            payload: what the worker's handler gets (a dict or a msgspec Struct). A struct's
                `Personal()` / `Secret()` fields are sealed by the key service before anything
                is stored (agents/sealing.py); the worker's handler gets them opened.
            priority: 0 (lowest) to 9 (highest).
            deadline: when the task must have finished: a time (with a zone), or seconds from
                now. Past it, the task is not started, and a running one is cancelled; either
                way it fails.
            max_attempts: runs of the handler at most (1-10; default: the worker's).
            task_id: the task's id; submitting the same id again within the stream's
                duplicate window stores nothing new, and neither does it, at any time, once a
                worker has taken the task (its state is past `submitted`).
            context_id: the conversation (A2A `contextId`; default: the task id).
            kind: what kind of work it is (a type name such as `thumbnail`): what the
                worker's `accepts` policy checks, and `ctx.kind` to its handler. None: the
                task is of kind `queue.task`.

        Raises:
            TaskSubmitError: a term is out of range (it names which).
            InvalidNameError: the queue or task id cannot be a subject token.
            KeyServiceUnavailableError, KeyServiceError: the payload has sealed fields and
                the key service did not seal them (nothing was stored).
        """
        check_queue(queue)
        if (
            isinstance(priority, bool)
            or not isinstance(priority, int)
            or priority not in PRIORITIES
        ):
            raise TaskSubmitError(
                queue=queue, field="priority", value=priority, reason="use 0 (lowest) to 9"
            )
        if max_attempts is not None and (
            isinstance(max_attempts, bool)
            or not isinstance(max_attempts, int)
            or not 1 <= max_attempts <= MAX_ATTEMPTS
        ):
            raise TaskSubmitError(
                queue=queue,
                field="max_attempts",
                value=max_attempts,
                reason=f"use 1 to {MAX_ATTEMPTS}",
            )
        terms = {QUEUE_KEY: queue, PRIORITY_KEY: str(priority)}
        if deadline is not None:
            due = _due(queue, deadline)
            terms[DEADLINE_KEY] = due.isoformat()
        if max_attempts is not None:
            terms[ATTEMPTS_KEY] = str(max_attempts)
        if kind is not None:
            terms[KIND_KEY] = _checked_kind(queue, kind)
        terms[SUBMITTER_KEY] = self.submitter
        if task_id is not None:
            known, _ = await self._read(task_id, queue)
            if known is not None and known.state != "submitted":
                return task_id  # taken, or ended: a second copy would run it again
        task_id = task_id or new_event_id()
        task_subject = self.subjects.queued_task_events(queue, self.submitter, task_id)
        context_id = context_id or task_id
        message = A2AMessage(
            type=TASK_MESSAGE_TYPE,
            payload=_as_payload(payload),
            metadata=A2AMetadata(sender=self.sender),
            message_id=wire.derived_id(task_id, "submit", "message"),
            context_id=context_id,
            task_id=task_id,
            role="user",
            parts=parts or [],
        )
        plan = sealing.plan_of(payload)
        if plan is not None:  # sealed once, for the task's message: its status holds it too
            message = await sealing.seal_message(self._keys, message, plan, f"queue.{queue}")
        # The status first: a worker never sees a task whose `submitted` is not stored.
        status = _status(
            task_id,
            context_id,
            "submitted",
            event_id=wire.derived_id(task_id, "submit", "submitted"),
            sender=self.sender,
            message=message,
        )
        terms[STATUS_SEQ_KEY] = str(await self._store(task_subject, *status))
        self._remember(task_id, task_subject)
        body, wire_headers = wire.encode(
            f"queue.{queue}",
            wire.MESSAGE_TYPE,
            message,
            event_id=message.message_id or task_id,
            correlation_id=context_id,
            trace=wire.current_trace(),
            metadata=terms,
        )
        await self._store(self.subjects.task(queue, priority), body, wire_headers)
        return task_id

    async def cancel(self, task_id: str, *, queue: str | None = None) -> bool:
        """Cancel a task: queued, it is skipped; running, its worker cancels its handler.
        `queue`: the task's queue (needed only for a task this TaskQueue did not submit, on
        a connection that may read only its own subjects).

        Returns:
            True when this stored `canceled`; False when the task had ended already (its state
            stays what it was).

        Raises:
            TaskNotFoundError: nothing is stored for this task.
            TaskQueueUnknownError: its queue is needed and not known.
        """
        task, subject = await self._read(task_id, queue)
        if task is None:
            raise TaskNotFoundError(task_id=task_id, subject=subject)
        if task.state in TERMINAL_STATES:
            return False
        status = _status(
            task_id,
            task.context_id,
            "canceled",
            event_id=wire.derived_id(task_id, "cancel", "canceled"),
            sender=self.sender,
        )
        if task.position and "*" in subject:  # found by a filter: store on the task's own
            subject = await self._found_subject(task.position, subject)
        await self._store(subject, *status)
        with contextlib.suppress(NatsError):  # the stored status is the truth; this is news
            await self._nc.publish(self.subjects.task_cancels, task_id.encode())
        return True

    async def _found_subject(self, position: int, pattern: str) -> str:
        """The subject of the message at `position` (one that `pattern` matched)."""
        msg = await self._direct.get("find a task's subject", seq=position)
        subject = (msg.headers or {}).get(headers.SUBJECT, "") if msg is not None else ""
        if not subject:
            raise TaskNotFoundError(task_id=pattern.rpartition(".")[2], subject=pattern)
        return subject

    async def get(self, task_id: str, *, queue: str | None = None) -> Task | None:
        """The task as stored so far (None when it has no events). `queue`: as for `cancel`.

        Raises:
            TaskQueueUnknownError: its queue is needed and not known.
        """
        task, _ = await self._read(task_id, queue)
        return task

    async def wait(
        self,
        task_id: str,
        *,
        queue: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - one deadline over the polls
        interval: float = 0.05,
    ) -> Task:
        """The task once it is in a terminal state (polled every `interval`, doubling to 1 s).
        `queue`: as for `cancel`.

        Raises:
            TaskWaitTimeoutError: it had not ended within `timeout` seconds.
            TaskQueueUnknownError: its queue is needed and not known.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            task = await self.get(task_id, queue=queue)
            if task is not None and task.state in TERMINAL_STATES:
                return task
            left = deadline - loop.time()
            if left <= 0:
                raise TaskWaitTimeoutError(
                    task_id=task_id,
                    state=task.state if task is not None else "not stored",
                    waited=timeout,
                )
            await asyncio.sleep(min(interval, left))
            interval = min(interval * 2, 1.0)


def _checked_kind(queue: str, kind: str) -> str:
    reason = f"a type name of at most {_MAX_TERM} characters, such as 'thumbnail'"
    try:
        check_type_name(kind)
    except InvalidNameError as error:
        reason = f"{error.reason}; {reason}"
    else:
        if len(kind) <= _MAX_TERM:
            return kind
    raise TaskSubmitError(queue=queue, field="kind", value=kind, reason=reason)


def _due(queue: str, deadline: datetime | float) -> datetime:
    now = datetime.now(UTC)
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise TaskSubmitError(
                queue=queue, field="deadline", value=deadline, reason="give a time zone"
            )
        due = deadline
    elif isinstance(deadline, int | float) and not isinstance(deadline, bool):
        due = now + timedelta(seconds=float(deadline))
    else:
        raise TaskSubmitError(
            queue=queue, field="deadline", value=deadline, reason="a datetime or seconds from now"
        )
    if due <= now:
        raise TaskSubmitError(queue=queue, field="deadline", value=deadline, reason="it has passed")
    return due.astimezone(UTC)


# -- working ---------------------------------------------------------------------------------------

TaskHandler = Callable[["TaskContext", Any], Awaitable[Any]]


class TaskContext(Context):
    """What a task handler sees: the runtime's Context plus the task's terms and cancellation."""

    terms: TaskTerms | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._canceled = False  # a flag, not an asyncio.Event: nothing waits on it
        self._result: Any = None
        self._scope: asyncio.Timeout | None = None
        self.status_subject: str | FuseError | None = None
        """Where the task's statuses go (RunningWorker sets it), or why nowhere."""
        self._last_status_only = False  # its worker may read only the task's last event

    def _task_subject(self, task_id: str) -> str:
        if self.message.type != TASK_MESSAGE_TYPE:
            return super()._task_subject(task_id)  # not a queued task: as any agent's
        if isinstance(self.status_subject, FuseError):
            raise self.status_subject
        if self.status_subject is None:  # a context no worker made
            return self._runtime.subjects.task_events(task_id)
        return self.status_subject

    async def task(self) -> Task | None:
        """The task as stored so far (as `Context.task`; on a connection that may read only
        its own subjects, from its last status)."""
        if self.message.type != TASK_MESSAGE_TYPE:
            return await super().task()
        runtime = self._runtime
        subject = self._task_subject(self.task_id)
        if self._last_status_only:
            return await read_last_status(runtime._direct, subject, self.task_id)
        return await read_task(runtime._direct, runtime.subjects, self.task_id, subject)

    @property
    def cancelled(self) -> bool:
        """True once the task was canceled (the handler is being cancelled, too)."""
        return self._canceled

    @property
    def priority(self) -> int:
        return self.terms.priority if self.terms is not None else 0

    @property
    def deadline(self) -> datetime | None:
        return self.terms.deadline if self.terms is not None else None

    @property
    def kind(self) -> str:
        """The task's kind (`submit(kind=)`; `queue.task` when it gave none)."""
        kind = self.terms.kind if self.terms is not None else None
        return kind or TASK_MESSAGE_TYPE


class _Lane(asyncio.Queue[Msg]):
    """One priority's pulled messages on one worker, and since when its head waits."""

    def __init__(self, priority: int, arrived: asyncio.Event) -> None:
        super().__init__()
        self.priority = priority
        self.msgs: deque[Msg] = deque()
        self.head_since = 0.0
        self._arrived = arrived

    def put_nowait(self, item: Msg) -> None:
        if not self.msgs:
            self.head_since = time.monotonic()
        self.msgs.append(item)
        self._arrived.set()

    def qsize(self) -> int:
        return len(self.msgs)


class Worker:
    """A queue's worker definition: its handler and settings; `run` starts one worker.

    Example:
        >>> async def resize(ctx: TaskContext, job: dict[str, str]) -> dict[str, str]:
        ...     return {"thumbnail": job["image"] + ".small"}
        >>> worker = Worker("resize", resize, concurrency=4)

        `async with worker.run(nc):` takes tasks of queue `resize` until closed.

    Args:
        queue: the queue's name.
        handler: `async def f(ctx, payload)`; its return value completes the task, an exception
            retries it (with backoff) until its attempts are spent, then fails it with a dead
            letter holding the last error. A payload annotated as a msgspec Struct is converted.
        concurrency: handlers in flight on this worker (it pulls no more than it can run soon).
        aging: seconds a lower priority's first task waits at the head before it goes first.
        max_attempts: attempts of a task that does not say (1-10).
        backoff: (first, most) seconds between attempts, doubling.
        ack_wait: seconds before a task whose worker went silent is handed to another.
        election_timeout: seconds a task's writes and reads ride out a leader election or a
            reconnect before its delivery fails (and spends one of its attempts).
        accepts: which senders may submit which kinds of task (sender type -> kinds,
            `{"planner": ["thumbnail"], "*": ["ping"]}`): the agents' message policy
            (`Agent(accepts=)`), with the task's kind in place of the message type. The
            sender is the identity that signed the task where the connection has a Trust,
            else the submitter it claims (`TaskQueue(sender=)`). A denied task is not run
            nor retried: it fails at once with the reason (`message denied: ...`), and the
            refusals make a bounded `permission.denied` on the worker's stream. None (the
            default): every kind from every sender runs; `{}` runs nothing.
    """

    def __init__(
        self,
        queue: str,
        handler: TaskHandler,
        *,
        concurrency: int = 4,
        aging: float = 2.0,
        max_attempts: int = 3,
        backoff: tuple[float, float] = (0.5, 30.0),
        ack_wait: float = 30.0,
        version: str = "0.0.0",
        heartbeat: float = DEFAULT_HEARTBEAT,
        election_timeout: float = 15.0,
        accepts: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.queue = check_queue(queue)
        if not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise AgentConfigError(
                agent=worker_type(queue),
                field="max_attempts",
                value=max_attempts,
                reason=f"use 1 to {MAX_ATTEMPTS}",
            )
        if not aging > 0:
            raise AgentConfigError(
                agent=worker_type(queue), field="aging", value=aging, reason="seconds above 0"
            )
        self.aging = float(aging)
        self.max_attempts = max_attempts
        self.agent = Agent(
            worker_type(queue),
            description=f"worker of task queue {queue!r}",
            max_attempts=MAX_ATTEMPTS,
            backoff=backoff,
            ack_wait=ack_wait,
            concurrency=concurrency,
            version=version,
            heartbeat=heartbeat,
            election_timeout=election_timeout,
            accepts=accepts,
        )
        self.agent.handler(TASK_MESSAGE_TYPE)(handler)  # type: ignore[arg-type]

    def run(
        self,
        nc: Client,
        *,
        key: str | None = None,
        prefix: str = "fuse",
        stream: MessageStreamSpec | None = None,
        store: EventStore | None = None,
    ) -> RunningWorker:
        """One worker on `nc` (an async context manager); `key` names it (random by default)."""
        subjects = Subjects(prefix)
        return RunningWorker(
            self,
            nc,
            AgentId.of(self.agent.type, key or uuid.uuid4().hex[:8]),
            subjects,
            stream or MessageStreamSpec(subjects=subjects),
            store=store,
        )


class RunningWorker(RunningAgent):
    """One running worker of a queue; counts what it handled, skipped, expired and cancelled."""

    _context_class = TaskContext

    def __init__(
        self,
        worker: Worker,
        nc: Client,
        agent_id: AgentId,
        subjects: Subjects,
        stream: MessageStreamSpec,
        *,
        store: EventStore | None = None,
    ) -> None:
        super().__init__(worker.agent, nc, agent_id, subjects, stream, fast_path=False, store=store)
        self.worker = worker
        self.skipped = 0
        """Tasks taken that had ended already (canceled while queued): not run."""
        self.expired = 0
        """Tasks failed at their deadline (before or while running)."""
        self.cancelled = 0
        """Running tasks whose handler was cancelled because the task was canceled."""
        self.started: deque[tuple[int, float]] = deque(maxlen=100_000)
        """(priority, seconds waited since submission) of the tasks this worker started, the
        newest 100 000."""
        self._arrived = asyncio.Event()
        self._lanes: list[_Lane] = []
        self._keeper: asyncio.Task[None] | None = None
        self._running: dict[str, TaskContext] = {}
        self._held: dict[TaskContext, Msg] = {}  # each running delivery: the keeper beats for it
        self._cancels: Subscription | None = None
        self._signers: dict[str, _Sender] = {}  # who signed each delivery being handled

    def _consumers(self) -> list[DurableSpec]:
        agent = self.agent
        return queue_consumers(
            self.worker.queue,
            self.subjects,
            ack_wait=agent.ack_wait,
            max_deliver=agent.max_attempts + 1,
        )

    def _context(
        self,
        msg: Msg,
        envelope: Envelope,
        message: A2AMessage,
        *,
        consumer: str,
        attempt: int,
        position: int,
    ) -> Context:
        ctx = super()._context(
            msg, envelope, message, consumer=consumer, attempt=attempt, position=position
        )
        if isinstance(ctx, TaskContext) and message.type == TASK_MESSAGE_TYPE:
            ctx.status_subject = self._status_subject(msg, envelope, message, ctx.task_id)
            ctx._last_status_only = reads_own_subjects_only(self._nc)
        return ctx

    def _sender(self, msg: Msg, message: A2AMessage) -> _Sender:
        who = super()._sender(msg, message)
        if msg.reply:  # the delivery's ack subject: its contexts need the signer too
            self._signers[msg.reply] = who
        return who

    async def _deliver(self, msg: Msg, consumer: str) -> None:
        try:
            await super()._deliver(msg, consumer)
        finally:
            if msg.reply:
                self._signers.pop(msg.reply, None)

    def _status_subject(
        self, msg: Msg, envelope: Envelope, message: A2AMessage, task_id: str
    ) -> str | FuseError:
        """Where a task's statuses go: under this worker's queue and the submitter that signed
        it (where this connection trusts signatures: a task naming another submitter cannot
        write into that one's tasks), else the submitter its terms name; a task without a
        submitter term (an older client's) on the task's own subject. An error: nowhere (its
        signature does not verify, or its task id cannot be a token)."""
        claimed = envelope.metadata.get(SUBMITTER_KEY)
        try:
            if claimed is None:  # an older client's: where it waits (any agent may write it)
                return self.subjects.task_events(task_id)
            submitter = claimed
            if trust_of(self._nc) is not None:  # the signer (checked once per delivery)
                who = self._signers.get(msg.reply) if msg.reply else None
                who = who or self._sender(msg, message)
                if who.unverified is not None:
                    raise InvalidNameError(
                        kind="task submitter", name=claimed, reason=who.unverified
                    )
                submitter = who.identity
            return self.subjects.queued_task_events(self.worker.queue, submitter, task_id)
        except InvalidNameError as error:
            log.warning("worker %s: task %r: no status subject: %s", self.agent_id, task_id, error)
            return error

    def _lane(self, spec: DurableSpec) -> tuple[asyncio.Queue[Msg], int]:
        lane = _Lane(int(spec.name.rsplit("-p", 1)[1]), self._arrived)
        self._lanes.append(lane)
        self._lanes.sort(key=lambda one: -one.priority)
        return lane, max(2, self.agent.concurrency)

    async def _start(self) -> None:
        self._cancels = await self._nc.subscribe(self.subjects.task_cancels, cb=self._on_cancel)
        await super()._start()
        self._keeper = asyncio.create_task(self._keep(), name=f"newfuse-worker-{self.agent_id}")

    async def _take(self) -> Msg:
        while True:
            msg = self._choose()
            if msg is not None:
                return msg
            self._arrived.clear()
            await self._arrived.wait()

    def _choose(self) -> Msg | None:
        """The highest priority's head, unless a lower head has waited `aging` (then the one
        that has waited longest)."""
        now = time.monotonic()
        top: _Lane | None = None
        aged: _Lane | None = None
        for lane in self._lanes:  # highest priority first
            if not lane.msgs:
                continue
            if top is None:
                top = lane
            elif now - lane.head_since >= self.worker.aging and (
                aged is None or lane.head_since < aged.head_since
            ):
                aged = lane
        chosen = aged or top
        if chosen is None:
            return None
        msg = chosen.msgs.popleft()
        if chosen.msgs:
            chosen.head_since = now
        return msg

    async def _keep(self) -> None:
        """Every ack_wait / 3, the tasks this worker holds say `in progress`, so none is
        redelivered meanwhile: those running (one loop for all of them, where the runtime would
        start and cancel a beat task per handler) and, until the worker stops, those pulled and
        waiting in a lane (stopping, it hands those back)."""
        while True:
            await asyncio.sleep(self.agent.ack_wait / 3)
            held = list(self._held.values())
            if not self._stopping:
                held += [msg for lane in self._lanes for msg in lane.msgs]
            for msg in held:
                with contextlib.suppress(NatsError):
                    await msg.in_progress()

    async def close(self, *, grace: float | None = None) -> None:
        """Stop taking tasks (those pulled and not started go back at once), let the running
        ones finish (at most `grace` seconds, default ack_wait), deregister. Idempotent."""
        self._stopping = True
        await self._hand_back()
        await super().close(grace=grace)  # the keeper beats for the running ones meanwhile
        await self._hand_back()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self._cancels is not None:
            with contextlib.suppress(Exception):
                await self._cancels.unsubscribe()
            self._cancels = None

    async def _hand_back(self) -> None:
        for lane in self._lanes:
            while lane.msgs:
                msg = lane.msgs.popleft()
                with contextlib.suppress(Exception):
                    await msg.nak()

    # -- one task ---------------------------------------------------------------------------------

    def _open_attempts(self, envelope: Envelope) -> int:
        """A task whose sealed values do not open spends its own attempts (not the runtime's
        ten): retried while the key service is out, then failed with the reason."""
        with contextlib.suppress(InvalidPayloadError):  # bad terms: `_call` fails it, later
            terms = terms_of(envelope.metadata, "its sealed values")
            return min(terms.max_attempts or self.worker.max_attempts, self.agent.max_attempts)
        return self.agent.max_attempts

    def _policy_type(self, envelope: Envelope, message: A2AMessage) -> str:
        """A task's kind (the runtime's policy check reads it in place of the message type)."""
        if message.type != TASK_MESSAGE_TYPE:
            return message.type  # not a task: as any agent
        return kind_of(envelope.metadata)

    async def _call(self, route: _Route, ctx: Context, msg: Msg | None) -> None:
        if not isinstance(ctx, TaskContext) or msg is None:  # not a queued task: as any agent
            await super()._call(route, ctx, msg)
            return
        terms = ctx.terms = terms_of(
            ctx.envelope.metadata, f"at position {ctx.position} on {msg.subject}"
        )
        task_id = ctx.task_id
        subject = ctx._task_subject(task_id)
        ctx._task_recorded = True  # the submitter stored the task's message with `submitted`
        limit = terms.max_attempts or self.worker.max_attempts
        if ctx.attempt > limit:  # the worker died in each earlier attempt
            raise TaskAttemptsError(
                task_id=task_id,
                attempts=ctx.attempt - 1,
                last_error="delivered without an outcome each time (did its worker die?)",
            )
        self._held[ctx] = msg
        self._running[task_id] = ctx  # from here on, an announced cancel reaches it
        try:
            loop = asyncio.get_running_loop()
            due = None
            if terms.deadline is not None:
                left = (terms.deadline - datetime.now(UTC)).total_seconds()
                if left <= 0:
                    if await self._state_of(task_id, subject) in TERMINAL_STATES:
                        self.skipped += 1
                        return
                    self.expired += 1
                    ctx.task_status(
                        "failed", text=f"its deadline {terms.deadline} passed before it started"
                    )
                    return
                due = loop.time() + left
            if not await self._start_working(ctx, terms, task_id, subject):
                self.skipped += 1  # canceled while queued (or ended: a redelivery)
                return
            submitted = msg.metadata.timestamp
            self.started.append((terms.priority, (datetime.now(UTC) - submitted).total_seconds()))
            await self._run(route, ctx, msg, task_id, due, limit)
        finally:
            del self._held[ctx]
            if self._running.get(task_id) is ctx:  # not a second delivery's (a stalled first)
                del self._running[task_id]

    async def _start_working(
        self, ctx: TaskContext, terms: TaskTerms, task_id: str, subject: str
    ) -> bool:
        """Store `working` unless the task ended; False when it had."""
        body, wire_headers = self._working(ctx, task_id)
        if ctx.attempt == 1 and terms.status_seq is not None:
            expect = {**wire_headers, headers.EXPECTED_LAST_SUBJECT_SEQUENCE: str(terms.status_seq)}
            try:  # nothing stored since `submitted`: no read needed
                await self._publish(subject, body, expect)
                return True
            except WrongLastSequenceError:
                pass  # something came after `submitted` (a cancel?): read what it was
        if await self._state_of(task_id, subject) in TERMINAL_STATES:
            return False
        await self._publish(subject, body, wire_headers)
        return True

    async def _run(
        self,
        route: _Route,
        ctx: TaskContext,
        msg: Msg,
        task_id: str,
        due: float | None,
        limit: int,
    ) -> None:
        async def keep_result(inner: Context, payload: Any) -> None:
            ctx._result = await route.handler(inner, payload)

        # One scope ends the handler at its deadline or at a cancel (which reschedules it to
        # now): the handler sees an asyncio cancellation either way, and no task is spawned
        # (its in-progress acks are the keeper's, see `_keep`).
        try:
            async with asyncio.timeout_at(due) as scope:
                ctx._scope = scope
                if ctx.cancelled:
                    scope.reschedule(asyncio.get_running_loop().time())
                await run_handler(_Route(keep_result, route.payload), ctx)
        except Exception as error:
            ended = isinstance(error, TimeoutError) and scope.expired()  # not the handler's own
            if ctx.cancelled:  # ended by the cancel, or it raised on seeing it
                ctx._effects.clear()  # nothing a canceled task emitted counts
                self.cancelled += 1
                return
            if ended:
                ctx._effects.clear()
                self.expired += 1
                ctx.task_status("failed", text=f"its deadline {ctx.deadline} passed while it ran")
                return
            retryable = not isinstance(error, FuseError) or error.retryable
            if retryable and ctx.attempt >= limit:
                raise TaskAttemptsError(
                    task_id=task_id,
                    attempts=ctx.attempt,
                    last_error=f"{type(error).__name__}: {error}",
                ) from error
            raise
        finally:
            ctx._scope = None
        if ctx.cancelled:
            ctx._effects.clear()
            self.cancelled += 1
            return
        ctx.task_status("completed", artifacts=result_artifacts(ctx._result))

    async def _commit(
        self,
        effects: list[Effect],
        consumer: str,
        position: int,
        attempt: int = 1,
        *,
        marker: bool = False,
    ) -> None:
        """As the runtime's, with the task's terminal status as the handled marker: it is stored
        last, after the other effects, so a redelivery that finds the task ended has nothing
        left to store (and skips it); the runtime's marker would be one more write per task.
        (A task that ends without a status of its worker's, canceled, was ended by the cancel.)"""
        if attempt > 1:
            effects = await self._missing(effects, position)
        if not effects:
            return
        *first, last = effects
        if first:
            await asyncio.gather(*(self._publish(*effect) for effect in first))
        await self._publish(*last)

    def _working(self, ctx: TaskContext, task_id: str) -> tuple[bytes, dict[str, str]]:
        return _status(
            task_id,
            ctx.message.context_id or task_id,
            "working",
            event_id=wire.derived_id(ctx.envelope.id, ctx.consumer, f"working.{ctx.attempt}"),
            sender=str(self.agent_id),
            causation_id=ctx.envelope.id,
        )

    async def _state_of(self, task_id: str, subject: str) -> str | None:
        """The task's state: its last event when that is a status of it, else its fold."""
        last = await self._direct.last_for(subject, f"read the state of task {task_id!r}")
        if last is None:
            return None
        with contextlib.suppress(FuseError):
            event = decode_task_event(last.data, position=sequence_of(last), subject=subject)
            payload = event.payload
            if isinstance(payload, TaskStatusUpdate) and payload.task_id == task_id:
                return payload.state
        if reads_own_subjects_only(self._nc):
            return None  # it may not read the whole subject: the last event was not a status
        task = await read_task(self._direct, self.subjects, task_id, subject)
        return task.state if task is not None else None

    async def _on_cancel(self, msg: Msg) -> None:
        """A cancel was announced: if the task runs here and its stored state says canceled
        (an announcement alone is anyone's), end its handler."""
        if len(msg.data) > MAX_STREAM_ID_BYTES:
            return
        task_id = msg.data.decode(errors="replace")
        ctx = self._running.get(task_id)
        if ctx is None:
            return
        try:
            state = await self._state_of(task_id, ctx._task_subject(task_id))
        except FuseError as error:
            log.warning("worker %s: cancel of %s not checked: %s", self.agent_id, task_id, error)
            return
        if state == "canceled":
            ctx._canceled = True
            if ctx._scope is not None:
                ctx._scope.reschedule(asyncio.get_running_loop().time())

    def _give_up(self, ctx: Context, error: str, answer: dict[str, Any] | None = None) -> None:
        super()._give_up(ctx, error, answer)
        if ctx.message.type != TASK_MESSAGE_TYPE or ctx.message.task_id is None:
            return  # not a task: no task to fail
        ctx._task_recorded = True
        try:  # the task fails with the dead letter (a task id that names no subject has none)
            ctx.task_status("failed", text=error)
        except FuseError as refused:
            log.warning("worker %s: no failed status: %s", self.agent_id, refused)


# -- listing ---------------------------------------------------------------------------------------


class QueueStats(msgspec.Struct, kw_only=True):
    """One queue as `fuse queues list` shows it.

    Attributes:
        queue: its name.
        depth: tasks waiting per priority (not yet handed to a worker; with no worker ever
            started, every message stored there).
        in_flight: tasks handed to a worker and not yet acknowledged.
        waiting_pulls: pull requests the queue's consumers hold (about one per idle worker).
        workers: live instances of the queue's worker type (healthy or stale in the registry).
        oldest_waiting: when the oldest waiting task was stored; `oldest_priority` its priority.
    """

    queue: str
    depth: dict[int, int] = {}
    in_flight: int = 0
    waiting_pulls: int = 0
    workers: int = 0
    oldest_waiting: datetime | None = None
    oldest_priority: int | None = None

    @property
    def total(self) -> int:
        return sum(self.depth.values())


async def queue_stats(
    nc: Client,
    *,
    prefix: str = "fuse",
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline per server answer
) -> list[QueueStats]:
    """Every queue with a task stored or a consumer under `prefix`, sorted by name. Reads the
    message stream (which must exist: StoreNotFoundError otherwise) and never creates anything.
    """
    subjects = Subjects(prefix)
    stream = subjects.message_stream_name
    await ensure_event_stream(nc, MessageStreamSpec(subjects=subjects), create=False)
    base = f"{prefix}.task."
    counts: dict[tuple[str, int], int] = {}
    info = await api_request(
        nc,
        f"{API}.STREAM.INFO.{stream}",
        {"subjects_filter": f"{base}>"},
        timeout=timeout,
        operation="list the task queues' subjects",
    )
    for subject, count in ((info.get("state") or {}).get("subjects") or {}).items():
        where = _queue_of(subject, base)
        if where is not None and isinstance(count, int):
            counts[where] = count
    consumers: dict[tuple[str, int], dict[str, Any]] = {}
    offset = 0
    while True:
        page = await api_request(
            nc,
            f"{API}.CONSUMER.LIST.{stream}",
            {"offset": offset},
            timeout=timeout,
            operation="list the task queues' consumers",
        )
        if api_error(page) is not None:
            break
        listed = page.get("consumers") or []
        for consumer in listed:
            config = consumer.get("config") or {}
            where = _queue_of(str(config.get("filter_subject") or ""), base)
            if where is not None and consumer.get("name") == consumer_name(*where):
                consumers[where] = consumer
        offset += len(listed)
        if not listed or offset >= int(page.get("total") or 0):
            break
    live: dict[str, int] = {}
    try:
        for one in await read_liveness(nc, subjects, timeout=timeout):
            if one.status != "down":
                live[one.agent_type] = live.get(one.agent_type, 0) + 1
    except StoreNotFoundError:
        pass  # no agent ever ran under this prefix
    direct = DirectGet(nc, stream, timeout=timeout)
    found: dict[str, QueueStats] = {}
    for where in sorted({*counts, *consumers}):
        queue, priority = where
        stats = found.get(queue)
        if stats is None:
            stats = found[queue] = QueueStats(queue=queue, workers=live.get(worker_type(queue), 0))
        consumer = consumers.get(where)
        after = 0
        if consumer is None:
            depth = counts.get(where, 0)
        else:
            depth = int(consumer.get("num_pending") or 0)
            stats.in_flight += int(consumer.get("num_ack_pending") or 0)
            stats.waiting_pulls = max(stats.waiting_pulls, int(consumer.get("num_waiting") or 0))
            after = int((consumer.get("delivered") or {}).get("stream_seq") or 0)
        stats.depth[priority] = depth
        if depth:
            first = await direct.get(
                "find the oldest waiting task", seq=after + 1, next_by_subj=subjects.task(*where)
            )
            stamp = (first.headers or {}).get(headers.TIME_STAMP) if first is not None else None
            when = _parse_time(stamp) if stamp else None
            if when is not None and (stats.oldest_waiting is None or when < stats.oldest_waiting):
                stats.oldest_waiting, stats.oldest_priority = when, priority
    return [found[name] for name in sorted(found)]


def _queue_of(subject: str, base: str) -> tuple[str, int] | None:
    if not subject.startswith(base):
        return None
    queue, dot, priority = subject[len(base) :].rpartition(".")
    if not dot or not queue or "." in queue or priority not in _PRIORITY_NAMES:
        return None
    return queue, int(priority)


def _parse_time(text: str) -> datetime | None:
    """A server time stamp (RFC 3339 with up to nanoseconds) as a datetime."""
    main, _, rest = text.rstrip("Z").partition(".")
    digits = "".join(c for c in rest if c.isdigit())[:6]
    try:
        return datetime.fromisoformat(f"{main}.{digits or '0'}+00:00")
    except ValueError:
        return None
