"""Subject names under a prefix, and the name of the JetStream stream that holds the events."""

from __future__ import annotations

from newfuse.errors import InvalidNameError
from newfuse.schemas import (
    MAX_PREFIX_BYTES,
    MAX_STREAM_ID_BYTES,
    StreamName,
    check_category,
    check_token,
)


class Subjects:
    """Every subject newfuse uses, under one prefix (the first token, default `fuse`).

    Example:
        >>> s = Subjects("fuse")
        >>> s.events("agent.r1"), s.stream_name
        ('fuse.ev.agent.r1', 'FUSE_EVENTS')
    """

    __slots__ = (
        "_a2a",
        "_event_prefix",
        "liveness_stream_name",
        "message_stream_name",
        "prefix",
        "stream_name",
        "timer_stream_name",
    )

    def __init__(self, prefix: str) -> None:
        check_token(
            prefix, kind="subject prefix", max_bytes=MAX_PREFIX_BYTES, limit_name="MAX_PREFIX_BYTES"
        )
        if not all(c.isalnum() or c in "-_" for c in prefix):
            raise InvalidNameError(
                kind="subject prefix",
                name=prefix,
                reason="use letters, digits, '-' and '_' only (it also names the JetStream stream)",
            )
        self.prefix = prefix
        self.stream_name = f"{prefix.upper().replace('-', '_')}_EVENTS"
        """The JetStream stream holding every event under this prefix."""
        self._event_prefix = f"{prefix}.ev."
        self.message_stream_name = f"{prefix.upper().replace('-', '_')}_A2A"
        """The JetStream stream holding A2A messages and task queues (no version checks)."""
        self._a2a = f"{prefix}.a2a."
        self.liveness_stream_name = f"{prefix.upper().replace('-', '_')}_AGENTS"
        self.timer_stream_name = f"{prefix.upper().replace('-', '_')}_TIMERS"
        """The JetStream stream of the timers (message schedules, ADR-51) and their fires."""
        """The JetStream stream holding each agent instance's last heartbeat (one per subject)."""

    def events(self, stream: str) -> str:
        """The subject of one event stream: `<prefix>.ev.<category>.<id>`."""
        return self._event_prefix + str(StreamName.parse(stream))

    def events_unchecked(self, stream: str) -> str:
        """As `events`, for a stream name the caller has already validated (hot paths)."""
        return self._event_prefix + stream

    def category(self, category: str) -> str:
        """The wildcard subject of every stream of a category: `<prefix>.ev.<category>.*`."""
        return f"{self._event_prefix}{check_category(category)}.*"

    @property
    def all_events(self) -> str:
        """The wildcard subject of every event: `<prefix>.ev.>` (the stream's only subject)."""
        return f"{self._event_prefix}>"

    def a2a(self, agent_id: str) -> str:
        """The subject of A2A messages to one agent: `<prefix>.a2a.<agent>`."""
        return f"{self.prefix}.a2a.{check_token(agent_id, kind='agent id')}"

    def task(self, queue: str, priority: int | str) -> str:
        """The subject of a task queue at one priority: `<prefix>.task.<queue>.<priority>`."""
        check_token(queue, kind="task queue")
        return f"{self.prefix}.task.{queue}.{check_token(str(priority), kind='task priority')}"

    @property
    def all_messages(self) -> tuple[str, str]:
        """The message stream's subjects: `<prefix>.a2a.>` and `<prefix>.task.>`."""
        return f"{self._a2a}>", f"{self.prefix}.task.>"

    def agent_type(self, agent_type: str) -> str:
        """Messages to any instance of a type (competing consumers): `<prefix>.a2a.<type>`."""
        return self._a2a + agent_type

    def agent_instance(self, agent_type: str, key: str) -> str:
        """Messages to one instance: `<prefix>.a2a.<type>.<key>`."""
        return f"{self._a2a}{agent_type}.{key}"

    def topic(self, topic: str) -> str:
        """Messages to every subscriber of a topic: `<prefix>.a2a._topic.<topic>`."""
        return f"{self._a2a}_topic.{topic}"

    def reply(self, token: str) -> str:
        """Replies to one requester's request: `<prefix>.a2a._reply.<token>`."""
        return f"{self._a2a}_reply.{token}"

    def handled(self, consumer: str, position: int) -> str:
        """The marker that `consumer` committed the effects of the message at `position`."""
        return f"{self._a2a}_handled.{consumer}.{position}"

    def dead_letters(self, consumer: str) -> str:
        """Dead letters of one consumer: `<prefix>.a2a._dead.<consumer>`."""
        return f"{self._a2a}_dead.{consumer}"

    @property
    def all_dead_letters(self) -> str:
        """Dead letters of every consumer: `<prefix>.a2a._dead.*`."""
        return f"{self._a2a}_dead.*"

    def task_events(self, task_id: str) -> str:
        """Status events and messages of one A2A task: `<prefix>.a2a._task.<task_id>`."""
        return f"{self._a2a}_task.{_task_id(task_id)}"

    def queued_task_events(self, queue: str, submitter: str, task_id: str) -> str:
        """Status events of one queued task (agents/queues.py):
        `<prefix>.a2a._task.<queue>.<submitter>.<task_id>`. The queue and the submitter are
        tokens of their own so that nats-server can scope who writes and reads them: a queue's
        workers their queue's tasks, a submitter its own."""
        check_token(queue, kind="task queue")
        check_token(submitter, kind="task submitter")
        return f"{self._a2a}_task.{queue}.{submitter}.{_task_id(task_id)}"

    def any_queued_task_events(self, task_id: str, queue: str | None = None) -> str:
        """Queued task `task_id` of any submitter, of `queue` or any queue (a filter):
        `<prefix>.a2a._task.<queue or *>.*.<task_id>`."""
        where = "*" if queue is None else check_token(queue, kind="task queue")
        return f"{self._a2a}_task.{where}.*.{_task_id(task_id)}"

    @property
    def all_task_events(self) -> str:
        """Every task's events, queued or not: `<prefix>.a2a._task.>` (the task id is the last
        token)."""
        return f"{self._a2a}_task.>"

    def aggregate(self, aggregate_id: str) -> str:
        """Events of one result aggregation (closed, late replies):
        `<prefix>.a2a._aggregate.<aggregate_id>`."""
        check_token(
            aggregate_id,
            kind="aggregate id",
            max_bytes=MAX_STREAM_ID_BYTES,
            limit_name="MAX_STREAM_ID_BYTES",
        )
        return f"{self._a2a}_aggregate.{aggregate_id}"

    def models(self, source: str) -> str:
        """Records of model calls (`model.invoked`) by one agent type or source:
        `<prefix>.a2a._model.<source>`."""
        return f"{self._a2a}_model.{source}"

    @property
    def all_models(self) -> str:
        """Every model call record: `<prefix>.a2a._model.*`."""
        return f"{self._a2a}_model.*"

    def rpc(self, agent_type: str) -> str:
        """The fast path (core NATS request/reply, in no stream): `<prefix>.rpc.<type>`."""
        return f"{self.prefix}.rpc.{agent_type}"

    def key_service(self, operation: str) -> str:
        """Requests to the key service (core NATS, in no stream): `<prefix>.keys.<operation>`,
        `seal` or `open` (security/key_service.py)."""
        return f"{self.prefix}.keys.{operation}"

    @property
    def task_cancels(self) -> str:
        """Where a task's cancel is announced to its workers (core NATS, in no stream; the
        stored `canceled` status is the truth): `<prefix>.rpc._cancel`."""
        return f"{self.prefix}.rpc._cancel"

    def liveness(self, agent_type: str, key: str) -> str:
        """One instance's heartbeats (the stream keeps the last): `<prefix>.agents.<type>.<key>`."""
        return f"{self.prefix}.agents.{agent_type}.{key}"

    @property
    def all_liveness(self) -> str:
        """The liveness stream's subject: `<prefix>.agents.>`."""
        return f"{self.prefix}.agents.>"

    def timer_schedule(self, namespace: str, key: str) -> str:
        """The schedule of one timer (one message, replaced when set again):
        `<prefix>.timer.at.<namespace>.<key>` (a key is one or more tokens)."""
        return f"{self.prefix}.timer.at.{namespace}.{key}"

    def timer_fired(self, namespace: str, key: str = ">") -> str:
        """Where a timer's schedule fires: `<prefix>.timer.fired.<namespace>.<key>` (the default
        `>`: every fire of the namespace)."""
        return f"{self.prefix}.timer.fired.{namespace}.{key}"

    @property
    def all_timers(self) -> str:
        """The timer stream's subject: `<prefix>.timer.>`."""
        return f"{self.prefix}.timer.>"

    def stream_of(self, subject: str) -> str:
        """The stream name (`<category>.<id>`) of an event subject; InvalidNameError otherwise."""
        if not subject.startswith(self._event_prefix):
            raise InvalidNameError(
                kind="event subject",
                name=subject,
                reason=f"it does not start with {self._event_prefix!r}",
            )
        return str(StreamName.parse(subject[len(self._event_prefix) :]))

    def __repr__(self) -> str:
        return f"Subjects({self.prefix!r})"


def _task_id(task_id: str) -> str:
    return check_token(
        task_id, kind="task id", max_bytes=MAX_STREAM_ID_BYTES, limit_name="MAX_STREAM_ID_BYTES"
    )
