"""The agent runtime: handlers per message type, durable delivery, exactly-once effects.

Delivery is at-least-once: a message is acked only after its handler returned and its effects
are stored. What a handler emits (messages to agents and topics, its reply) is buffered; when
it returns, the effects are published (pipelined, each awaiting its PubAck, ids derived from the
message handled: wire.derived_id), then a marker on `<prefix>.a2a._handled.<consumer>.<position>`
with an expected last subject sequence of 0, then the ack. A redelivery that finds the marker is
acked without running the handler. One that does not (the process died before the marker) runs
the handler again and publishes only the effects whose ids are not already on their subjects
after the message's position (a scan by direct get), so no effect repeats, also after the
duplicate window. Atomic batches (ADR-50) would make this one step, but on a file stream each
commit costs an fsync (~4 ms) and they serialize the stream (about 160 commits/s here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple, Protocol

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from opentelemetry import context as otel_context
from opentelemetry import trace

from newfuse import telemetry
from newfuse.agents import sealing, wire
from newfuse.agents.address import AgentId, check_agent_name
from newfuse.agents.models.base import ChatResult, ModelProvider
from newfuse.agents.models.recording import (
    INVOKED_TYPE,
    RECORDS_IN_FLIGHT,
    CallLog,
    RecordedModel,
    RecordWriter,
    decode_invoked,
)
from newfuse.agents.policy import MessagePolicy, sender_type
from newfuse.agents.registry import DEFAULT_HEARTBEAT, Registration, card_of, stream_of
from newfuse.agents.tasks import (
    SENDER,
    STATUS_TYPE,
    TASK_STATES,
    Task,
    read_task,
    task_id_for,
)
from newfuse.errors import (
    AgentConfigError,
    FuseError,
    HandlerRegistrationError,
    InvalidPayloadError,
    MessageDeniedError,
    ProtocolVersionError,
    PublishTimeoutError,
)
from newfuse.eventstore import EventStore
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import headers
from newfuse.nats.connection import reads_own_subjects_only
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.durable import DurableSpec, PullLoop, ensure_durable
from newfuse.nats.jserrors import WrongLastSequenceError, decode_pub_ack
from newfuse.nats.micro import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    SEMVER_RE,
    Endpoint,
    MicroService,
    service_name,
)
from newfuse.nats.provision import MessageStreamSpec, ensure_event_stream
from newfuse.nats.publish import PubAckInbox
from newfuse.nats.signing import SenderError, trust_of
from newfuse.nats.subjects import Subjects
from newfuse.reliability import backoff
from newfuse.schemas import (
    DEFAULT_PROTOCOLS,
    A2AMessage,
    A2AMetadata,
    AgentCapabilities,
    AgentProvider,
    AgentSkill,
    Artifact,
    ChatMessage,
    DeadLetter,
    Envelope,
    ModelInvoked,
    Part,
    SchemaRegistry,
    TaskState,
    TaskStatusUpdate,
    Tool,
    VersionRange,
    check_token,
)
from newfuse.schemas.sealed import SealPlan
from newfuse.security.events import DenialRecorder
from newfuse.security.key_service import KeyServiceClient

log = logging.getLogger("newfuse.agents")

Handler = Callable[["Context", Any], Awaitable[Any]]
Effect = tuple[str, bytes, dict[str, str]]
_UNTRACED: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)


class AgentRuntime(Protocol):
    """What a Context needs of the instance it runs in (a RunningAgent, or a replay's)."""

    agent_id: AgentId
    subjects: Subjects
    _direct: DirectGet

    def _provider_for(self, provider: ModelProvider) -> tuple[ModelProvider, str | None]:
        """The provider that answers a handler's model calls, and the model to ask for instead
        of the one the handler names (None: that one); a replay swaps them."""
        ...

    async def _store_record(self, ctx: Context, effect: Effect, call: int) -> bool:
        """Start storing a model record of `ctx`'s handler now (True), or leave it to be one of
        its effects (False: the fast path's, a replay's)."""
        ...


class _Route(msgspec.Struct, frozen=True):
    handler: Handler
    payload: Any  # the payload's type: a msgspec Struct class, or dict for raw payloads


class Context:
    """What a handler sees of the message it handles, and how it emits effects.

    Effects (`send`, `publish`, `reply`) are stored when the handler returns, all or none; a
    handler that raises emits nothing.
    """

    def __init__(
        self,
        runtime: AgentRuntime,
        envelope: Envelope,
        message: A2AMessage,
        *,
        consumer: str,
        attempt: int,
        position: int,
    ) -> None:
        self.envelope = envelope
        self.message = message
        self.consumer = consumer
        self.attempt = attempt
        """Which delivery this is (1 the first time)."""
        self.position = position
        """The message's JetStream sequence on the message stream (0 on the fast path)."""
        self._runtime = runtime
        self._effects: list[Effect] = []
        self._replied = False
        self._task_recorded = False
        # The span handling this message (current when the runtime builds a Context): every
        # effect names it as its parent, so a chain of agents is one trace.
        self._trace = wire.current_trace()
        self._model_log: _HandlerLog | None = None
        self._model_effects = 0
        self._unsealed = 0  # effects whose sealed fields the key service has yet to seal
        self.redacted: tuple[str, ...] = ()
        """Paths of the message's sealed fields that read as their replacement: their data
        subject was forgotten (`fuse forget`)."""
        self._opened: dict[str, Any] | None = None
        """The payload with its sealed fields opened, what the handler is given; `message`
        stays as stored (sealed), so what is recorded of it (a task's history) is too."""
        self._records: list[asyncio.Task[None]] = []  # model records being stored meanwhile

    @property
    def agent_id(self) -> AgentId:
        """The instance handling the message."""
        return self._runtime.agent_id

    @property
    def sender(self) -> str:
        return self.message.metadata.sender

    def _next_id(self, name: str = "") -> str:
        """The id of the next effect (derived from the message handled and the effect's index,
        so a redelivered handler that emits the same effects gets the same ids)."""
        index = str(len(self._effects) - self._model_effects)  # model records have their own
        return wire.derived_id(self.envelope.id, self.consumer, f"{index}{name}")

    def _effect(
        self,
        subject: str,
        stream: str,
        type_name: str,
        data: Any,
        *,
        metadata: dict[str, str] | None = None,
        event_id: str | None = None,
    ) -> str:
        event_id = event_id or self._next_id()
        self._effects.append(
            self._encoded(subject, stream, type_name, data, event_id=event_id, metadata=metadata)
        )
        return event_id

    def _encoded(
        self,
        subject: str,
        stream: str,
        type_name: str,
        data: Any,
        *,
        event_id: str,
        metadata: dict[str, str] | None = None,
    ) -> Effect:
        body, wire_headers = wire.encode(
            stream,
            type_name,
            data,
            event_id=event_id,
            correlation_id=self.envelope.correlation_id or self.envelope.id,
            causation_id=self.envelope.id,
            trace=self._trace,
            metadata=metadata,
        )
        return subject, body, wire_headers

    def _emit(
        self, subject: str, stream: str, message_type: str, payload: Any, **fields: Any
    ) -> str:
        fields.setdefault("context_id", self.message.context_id)
        message = A2AMessage(
            type=message_type,
            payload=_as_payload(payload),
            metadata=A2AMetadata(sender=str(self._runtime.agent_id)),
            message_id=self._next_id(),
            role="agent",
            **fields,
        )
        plan = sealing.plan_of(payload)
        if plan is not None:  # sealed by the key service when the handler returns
            self._effects.append(_Unsealed(subject, stream, message, plan))
            self._unsealed += 1
            return message.message_id or ""
        return self._effect(
            subject, stream, wire.MESSAGE_TYPE, message, event_id=message.message_id
        )

    async def _seal_effects(self) -> None:
        """Have the key service seal the sealed fields of the messages emitted (a failure fails
        the handler's run, as its own error would: retried, then dead-lettered)."""
        keys: KeyServiceClient | None = getattr(self._runtime, "_keys", None)
        fast_reply = self._runtime.subjects.reply("_call")
        for index, effect in enumerate(self._effects):
            if not isinstance(effect, _Unsealed):
                continue
            if effect[0] == fast_reply or keys is None:
                raise InvalidPayloadError(
                    type_name=effect.message.type,
                    version=1,
                    path="$.payload",
                    reason="it has sealed fields, which travel through the log only (a "
                    "fast-path answer or a replay stores nothing the key service could open)",
                )
            message = await sealing.seal_message(keys, effect.message, effect.plan, effect.stream)
            self._effects[index] = self._encoded(
                effect[0], effect.stream, wire.MESSAGE_TYPE, message, event_id=effect.event_id
            )
        self._unsealed = 0

    @property
    def task_id(self) -> str:
        """The task of the message handled: its `taskId`, or one derived from the message (the
        same on every redelivery) when it starts a task."""
        return self.message.task_id or task_id_for(self.envelope.id, self.consumer)

    @property
    def text(self) -> str:
        """The text parts of the message handled, joined by newlines ("" when it has none)."""
        return "\n".join(part.text for part in self.message.parts if part.text is not None)

    async def task(self) -> Task | None:
        """The task of the message handled as stored so far (None before its first status);
        what this handler emits is not in it until the handler returns."""
        runtime = self._runtime
        return await read_task(runtime._direct, runtime.subjects, self.task_id)

    def _task_subject(self, task_id: str) -> str:
        """Where the task's events are stored (a queued task's: agents/queues.py)."""
        return self._runtime.subjects.task_events(task_id)

    def task_status(
        self,
        state: TaskState,
        *,
        text: str | None = None,
        data: Any = None,
        artifacts: list[Artifact] | None = None,
        answer_type: str | None = None,
    ) -> str:
        """Move the task of the message handled to `state` (stored when the handler returns,
        with its other effects); returns the task id.

        The first call in a handler also records the message handled in the task's history.
        `text` and `data` are what the agent says with the change (a message with a text and a
        data part); an input-required status always carries such a message, and its type,
        `answer_type` (default: the type of the message handled), is the type the answer is
        sent with, so the handler of that type continues the task.

        Raises:
            InvalidNameError: the message's `taskId` cannot name a subject.
            InvalidPayloadError: `state` is not an A2A task state.
        """
        if state not in TASK_STATES:  # a struct the runtime builds is not validated again
            raise InvalidPayloadError(
                type_name=STATUS_TYPE,
                version=1,
                path="$.state",
                reason=f"{state!r} is not an A2A task state ({', '.join(TASK_STATES)})",
            )
        task_id = self.task_id
        subject, stream = self._task_subject(task_id), f"task.{task_id}"
        context_id = self.message.context_id or task_id
        sender = str(self._runtime.agent_id)
        if not self._task_recorded:
            self._task_recorded = True
            received = msgspec.structs.replace(
                self.message,
                task_id=task_id,
                context_id=context_id,
                message_id=self.message.message_id or self.envelope.id,
            )
            self._effect(subject, stream, wire.MESSAGE_TYPE, received)
        if sealing.plan_of(data) is not None:  # a part is not sealed: it would be in the clear
            raise InvalidPayloadError(
                type_name=STATUS_TYPE,
                version=1,
                path="$.message.parts",
                reason=f"{type(data).__qualname__} has sealed fields, and a status's data is "
                "not sealed: send them in a message (ctx.send, ctx.reply)",
            )
        parts = []
        if text is not None:
            parts.append(Part(text=text))
        if data is not None:
            parts.append(Part(data=msgspec.to_builtins(data)))
        said = None
        if parts or state == "input-required":
            said = A2AMessage(
                type=answer_type or self.message.type,
                metadata=A2AMetadata(sender=sender),
                message_id=self._next_id(".message"),
                context_id=context_id,
                task_id=task_id,
                role="agent",
                parts=parts,
            )
        update = TaskStatusUpdate(
            task_id=task_id,
            context_id=context_id,
            state=state,
            message=said,
            artifacts=artifacts or [],
        )
        self._effect(subject, stream, STATUS_TYPE, update, metadata={SENDER: sender})
        return task_id

    def model(self, provider: ModelProvider) -> RecordedModel:
        """`provider`, with each call recorded (`model.invoked` on `<prefix>.a2a._model.<type>`,
        stored in the background as soon as the model answered and always before the handler's
        outcome is committed, once however often the message is delivered) and traced with the
        OpenTelemetry GenAI attributes.

        Calls are numbered in the order the handler makes them (0, 1, ...): a redelivered
        handler whose earlier attempt stored call n gets that answer again when it asks the
        same (model and input) instead of calling the model. Records of a handler that
        raises are stored too (the calls were made and paid for), so its retry gets their
        answers back: vary the input to ask again.
        """
        if self._model_log is None:
            self._model_log = _HandlerLog(self)
        chosen, model = self._runtime._provider_for(provider)
        return RecordedModel(chosen, self._model_log, model=model)

    async def chat(
        self,
        provider: ModelProvider,
        messages: list[ChatMessage],
        *,
        model: str,
        tools: list[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> ChatResult:
        """One recorded chat call: `await ctx.model(provider).chat(...)`."""
        return await self.model(provider).chat(messages, model=model, tools=tools, params=params)

    def send(
        self,
        to: AgentId | str,
        message_type: str,
        payload: Any = None,
        *,
        parts: list[Part] | None = None,
        task_id: str | None = None,
    ) -> str:
        """Send to one instance (an AgentId) or to any instance of a type (a str); returns the
        message id (derived from the message handled)."""
        subjects = self._runtime.subjects
        if isinstance(to, AgentId):
            subject, stream = subjects.agent_instance(to.type, to.key), f"a2a.{to.type}"
        else:
            subject, stream = (
                subjects.agent_type(check_agent_name(to, kind="agent type")),
                f"a2a.{to}",
            )
        return self._emit(
            subject, stream, message_type, payload, parts=parts or [], task_id=task_id
        )

    def publish(self, topic: str, message_type: str, payload: Any = None) -> str:
        """Publish to every subscriber of `topic`; returns the message id."""
        check_agent_name(topic, kind="topic")
        return self._emit(
            self._runtime.subjects.topic(topic), f"topic.{topic}", message_type, payload
        )

    def reply(self, payload: Any, *, message_type: str | None = None) -> str | None:
        """Answer the request being handled (no-op if the sender asked for no reply)."""
        return self._reply(payload, message_type or f"{self.message.type}.reply")

    def _reply(self, payload: Any, message_type: str) -> str | None:
        token = self.message.reply_to
        if token is None or self._replied:
            return None
        self._replied = True
        return self._emit(
            self._runtime.subjects.reply(token),
            f"reply.{token}",
            message_type,
            payload,
            in_reply_to=self.envelope.id,
            task_id=self.message.task_id,
        )


class _Unsealed(tuple[str, bytes, dict[str, str]]):
    """An effect whose message has sealed fields still to seal. Its body stays empty until
    `Context._seal_effects` replaces it, so its plaintext is never in an effect."""

    message: A2AMessage
    stream: str
    plan: SealPlan
    event_id: str

    def __new__(cls, subject: str, stream: str, message: A2AMessage, plan: SealPlan) -> _Unsealed:
        effect = super().__new__(cls, (subject, b"", {}))
        effect.message, effect.stream, effect.plan = message, stream, plan
        effect.event_id = message.message_id or ""
        return effect


class _Sender(NamedTuple):
    """Who sent a message, as far as the receiving runtime can tell."""

    identity: str
    """Who answers for it: the identity that signed it, or (no Trust) the sender it claims."""
    type: str
    """The sender type the policy checks: a signing agent's type; the claimed sender's type
    for an admin or service signer, or where no Trust is configured."""
    unverified: str | None = None
    """Why its signature does not verify (then nothing is known of its sender)."""
    forged: str | None = None
    """Why the sender it claims is not the agent that signed it."""


def _denied_facts(error: MessageDeniedError) -> dict[str, Any]:
    """What a denied request's error answer adds to `{error}`: `denied` with the facts, from
    which AgentClient raises MessageDeniedError."""
    return {"denied": {"sender": error.sender, "receiver": error.receiver, "reason": error.reason}}


def _asked_once(message: A2AMessage) -> bool:
    """Whether `message` is a request asked once per key (its reply token says so)."""
    return message.reply_to is not None and message.reply_to.startswith(wire.ONCE_PREFIX)


def _failed(span: trace.Span, error: Exception, reason: str) -> None:
    """Mark a handler's span failed: the exception as an event, the status ERROR."""
    if span.is_recording():
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, reason))


class _HandlerLog(CallLog):
    """The model calls of one handler run: records are the handler's effects."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(
            agent=str(ctx.agent_id),
            correlation=ctx.envelope.id,
            context_id=ctx.message.context_id,
        )
        self._ctx = ctx
        self._reused: dict[int, ModelInvoked] = {}
        agent_type = ctx.agent_id.type
        self._subject = ctx._runtime.subjects.models(agent_type)
        self._stream = f"model.{agent_type}"

    def _id(self, call: int, attempt: int) -> str:
        """Call `call`'s record id: one per call (a redelivery stores it once), and one more per
        later attempt that asks the model again (an earlier record did not fit)."""
        name = f"model/{call}" if attempt < 2 else f"model/{call}.{attempt}"
        return wire.derived_id(self._ctx.envelope.id, self._ctx.consumer, name)

    async def recorded(self, call: int) -> ModelInvoked | None:
        """The latest record of call `call` an earlier attempt stored (None: none)."""
        ctx = self._ctx
        if ctx.attempt < 2 or ctx.position == 0:
            return None
        wanted = {self._id(call, attempt) for attempt in range(1, ctx.attempt)}
        direct = ctx._runtime._direct
        found = None
        async for msg in direct.messages(self._subject, "find recorded model calls", ctx.position):
            if (msg.headers or {}).get(headers.MSG_ID) not in wanted:
                continue
            with contextlib.suppress(FuseError):  # not ours to trust: as if not recorded
                found = decode_invoked(msg.data, position=0, subject=self._subject).invoked
        if found is not None:
            self._reused[call] = found
        return found

    async def write(self, invoked: ModelInvoked) -> None:
        self.records.append(invoked)
        if self._reused.get(invoked.call) is invoked:
            return  # an earlier attempt's record, stored already
        ctx = self._ctx
        effect = ctx._encoded(
            self._subject,
            self._stream,
            INVOKED_TYPE,
            invoked,
            event_id=self._id(invoked.call, ctx.attempt),
        )
        if not await ctx._runtime._store_record(ctx, effect, invoked.call):
            ctx._model_effects += 1
            ctx._effects.append(effect)


async def run_handler(route: _Route, ctx: Context) -> None:
    """Convert the payload to the handler's type, run it, and reply with what it returns.

    Raises:
        InvalidPayloadError: the payload does not fit the handler's type.
    """
    payload: Any = ctx.message.payload if ctx._opened is None else ctx._opened
    if route.payload is not dict:
        try:
            payload = msgspec.convert(payload, route.payload)
        except msgspec.ValidationError as error:  # the sender's mistake: retrying won't help
            raise InvalidPayloadError(
                type_name=ctx.message.type, version=1, path="$.payload", reason=str(error)
            ) from None
    result = await route.handler(ctx, payload)
    if result is not None:
        ctx.reply(result)
    if ctx._unsealed:
        await ctx._seal_effects()


def _as_payload(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    built = msgspec.to_builtins(value)
    if not isinstance(built, dict):
        return {"value": built}
    return built


def _payload_type(agent: str, message_type: str, fn: Handler) -> Any:
    try:
        hints = typing.get_type_hints(fn)
    except Exception as error:
        raise HandlerRegistrationError(
            agent=agent,
            message_type=message_type,
            reason=f"its annotations do not resolve: {error}",
        ) from None
    params = [name for name in fn.__code__.co_varnames[: fn.__code__.co_argcount]]
    if len(params) != 2:
        raise HandlerRegistrationError(
            agent=agent,
            message_type=message_type,
            reason=f"it takes {len(params)} parameters; write `async def f(ctx, payload)`",
        )
    if not asyncio.iscoroutinefunction(fn):
        raise HandlerRegistrationError(
            agent=agent, message_type=message_type, reason="it is not an `async def` function"
        )
    annotation = hints.get(params[1], dict)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation
    return dict


class Agent:
    """An agent type's definition: its handlers and delivery settings; `run` starts an instance.

    Example:
        >>> geo = Agent("geo")
        >>> @geo.handler("geo.lookup")
        ... async def lookup(ctx: Context, query: Lookup) -> Answer:
        ...     return Answer(city="Lima")

        `async with geo.run(nc, key="1"):` serves `geo/1` and any-instance messages to `geo`.

    Args:
        agent_type: the type (AutoGen's AgentId type); instances share its durable consumer.
        topics: topics every instance of the type subscribes to (one delivery per type).
        max_attempts: deliveries before a message becomes a dead letter.
        backoff: (first, most) seconds of the redelivery delay, doubling per attempt.
        ack_wait: seconds before an unacknowledged delivery is redelivered (a handler that
            runs longer sends in-progress acks, so only a dead instance lets it expire).
        concurrency: handlers in flight per instance.
        version: the agent's semantic version (its card's, and its micro service's: ADR-32).
        name: its name for people (default: the type); `description`, `provider`, `skills`
            and `capabilities` go on its card (A2A AgentCard).
        heartbeat: seconds between an instance's heartbeats (healthy within 2, stale within 5).
        protocols: the protocol versions it accepts (`>=1.0,<2.0`: comparisons joined by
            commas). A message outside is not handled: it is dead-lettered and a requester
            gets `<type>.error` naming both versions. A message without a version is taken
            to be of the current one.
        registry: the schema registry messages are read with; its upcasters of
            `a2a.message` bring older minor versions to the current shape.
        election_timeout: seconds a delivery's writes and reads ride out a JetStream leader
            election or a reconnect (retried to one deadline) before the delivery fails and
            the message is handed back; without it, each refusal of an electing stream would
            spend one of the message's attempts.
        accepts: its message policy: sender type -> the message types it accepts from it
            (`{"planner": ["task.assign"], "*": ["ping"]}`; `*` is any sender or any type).
            The runtime checks each message before its handler runs, against the identity
            that signed it where the connection has a Trust, else its `metadata.sender`. A
            denied message is not handled and not redelivered; a requester is answered at
            once (MessageDeniedError) and the refusals make a bounded `permission.denied`
            on the instance's stream. None (the default): no policy, every type from every
            sender is accepted; `{}` accepts nothing.
    """

    def __init__(
        self,
        agent_type: str,
        *,
        description: str = "",
        topics: tuple[str, ...] = (),
        max_attempts: int = 5,
        backoff: tuple[float, float] = (0.5, 30.0),
        ack_wait: float = 30.0,
        concurrency: int = 16,
        version: str = "0.0.0",
        name: str | None = None,
        provider: AgentProvider | None = None,
        skills: tuple[AgentSkill, ...] = (),
        capabilities: AgentCapabilities | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        protocols: str = DEFAULT_PROTOCOLS,
        registry: SchemaRegistry | None = None,
        election_timeout: float = 15.0,
        accepts: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.type = check_agent_name(agent_type, kind="agent type")
        if not isinstance(version, str) or not SEMVER_RE.match(version):
            raise AgentConfigError(
                agent=agent_type,
                field="version",
                value=version,
                reason="use a semantic version such as 1.4.0 (ADR-32 requires one)",
            )
        if not isinstance(heartbeat, int | float) or not heartbeat > 0:
            raise AgentConfigError(
                agent=agent_type,
                field="heartbeat",
                value=heartbeat,
                reason="seconds between heartbeats must be a number above 0",
            )
        self.version = version
        self.name = name or agent_type
        self.provider = provider
        self.skills = tuple(skills)
        self.capabilities = capabilities or AgentCapabilities()
        self.heartbeat = float(heartbeat)
        if not isinstance(election_timeout, int | float) or election_timeout < 0:
            raise AgentConfigError(
                agent=agent_type,
                field="election_timeout",
                value=election_timeout,
                reason="seconds to ride out a leader election must be a number, 0 or more",
            )
        self.election_timeout = float(election_timeout)
        self.description = description
        self.topics = tuple(check_agent_name(topic, kind="topic") for topic in topics)
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.ack_wait = ack_wait
        self.concurrency = concurrency
        self.protocols = VersionRange.parse(protocols)
        self.registry = wire.reading_registry(registry or wire.REGISTRY, self.type)
        self.routes: dict[str, _Route] = {}
        self.policy = MessagePolicy(self.type, accepts) if accepts is not None else None
        """What it accepts from whom (None: everything from everyone)."""

    def handler(self, message_type: str) -> Callable[[Handler], Handler]:
        """Decorator: `async def f(ctx, payload)` handles messages of `message_type`.

        The payload's annotation (a msgspec Struct) is what `payload` is converted to; without
        one the handler gets the payload dict. A returned value is the reply to a request.
        """

        def decorate(fn: Handler) -> Handler:
            if message_type in self.routes:
                raise HandlerRegistrationError(
                    agent=self.type, message_type=message_type, reason="it has a handler already"
                )
            self.routes[message_type] = _Route(fn, _payload_type(self.type, message_type, fn))
            return fn

        return decorate

    def run(
        self,
        nc: Client,
        *,
        key: str | None = None,
        prefix: str = "fuse",
        stream: MessageStreamSpec | None = None,
        fast_path: bool = True,
        store: EventStore | None = None,
        tracer: trace.Tracer | None = None,
    ) -> RunningAgent:
        """An instance of this agent on `nc` (an async context manager).

        Args:
            nc: a connected client.
            key: the instance's key (AgentId key); a random one by default.
            prefix: the subject prefix.
            stream: the message stream's settings, if this instance may create it.
            fast_path: also answer core NATS requests on `<prefix>.rpc.<type>`.
            store: the event store its registration events go to (default: the JetStream
                store of `prefix` on `nc`).
            tracer: where its spans go (default: newfuse's tracer from the global provider;
                a no-op until an application installs one).
        """
        subjects = Subjects(prefix)
        return RunningAgent(
            self,
            nc,
            AgentId.of(self.type, key or uuid.uuid4().hex[:8]),
            subjects,
            stream or MessageStreamSpec(subjects=subjects),
            fast_path=fast_path,
            store=store,
            tracer=tracer,
        )


def consumer_specs(agent: Agent, key: str, subjects: Subjects) -> list[DurableSpec]:
    """The durable consumers an instance `key` of `agent` reads: `<type>` (shared by every
    instance: the type's inbox and its topics) and `<type>__<key>` (its own inbox)."""
    common: dict[str, Any] = {
        "stream": subjects.message_stream_name,
        "ack_wait": agent.ack_wait,
        "max_deliver": agent.max_attempts + 1,  # the extra one turns a crash loop dead
    }
    shared = (subjects.agent_type(agent.type), *map(subjects.topic, agent.topics))
    own = (subjects.agent_instance(agent.type, key),)
    return [
        DurableSpec(name=agent.type, filter_subjects=shared, **common),
        DurableSpec(name=f"{agent.type}__{key}", filter_subjects=own, **common),
    ]


class RunningAgent:
    """One running instance of an Agent; counts what it handled.

    Subclasses (agents/queues.py's workers) change what is pulled and in which order through
    `_consumers`, `_lane` and `_take`, what a handler sees through `_context_class`, and what a
    dead letter adds through `_give_up`.
    """

    _context_class: type[Context] = Context

    def __init__(
        self,
        agent: Agent,
        nc: Client,
        agent_id: AgentId,
        subjects: Subjects,
        stream: MessageStreamSpec,
        *,
        fast_path: bool,
        store: EventStore | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.agent = agent
        self.agent_id = agent_id
        self.subjects = subjects
        self.instance = uuid.uuid4().hex
        """This run's id: its micro service id (ADR-32) and `instance` in its lifecycle events."""
        self.card = card_of(agent, subjects, fast_path=fast_path)
        self.handled = 0
        """Messages whose handler succeeded (effects stored) on this instance."""
        self.dead_lettered = 0
        self.already_handled = 0
        """Redeliveries whose effects were stored already (acked without running the handler)."""
        self.denied = 0
        """Messages its policy did not accept (not handled; see Agent's `accepts`)."""
        self._nc = nc
        self._stream = stream
        self._fast_path = fast_path
        self._pubacks = PubAckInbox(nc, f"agent {agent_id}")
        self._publish_timeout = 5.0
        self._direct = DirectGet(
            nc, subjects.message_stream_name, timeout=5.0, patience=agent.election_timeout
        )
        self._records = RecordWriter(self._publish, limit=RECORDS_IN_FLIGHT)
        self._keys = KeyServiceClient(nc, prefix=subjects.prefix, requester=str(agent_id))
        """Seals and opens its messages' sealed fields (agents/sealing.py)."""
        self._server_version = ""
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._loops: dict[str, PullLoop] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._rpc: Any = None
        self._stopping = False
        self._busy = 0
        self._idle = asyncio.Event()
        self._once_busy: dict[str, asyncio.Event] = {}
        """Envelope id -> the handling in flight of a copy of that request asked once."""
        self._own_store = store is None
        self._store: EventStore = store or JetStreamEventStore(nc, prefix=subjects.prefix)
        # on the instance's own stream: an agent identity may write it, not security.denials
        self._denials = DenialRecorder(
            self._store, seen_by=str(agent_id), stream=stream_of(agent.type, agent_id.key)
        )
        self.registration = Registration(
            nc,
            self._store,
            subjects,
            agent=agent,
            key=agent_id.key,
            instance=self.instance,
            card=self.card,
            publish=self._publish,
        )
        self.service = MicroService(
            nc,
            name=service_name(agent.type),
            version=agent.version,
            description=agent.description,
            metadata={
                "agent_id": str(agent_id),
                "agent_type": agent.type,
                "key": agent_id.key,
                "prefix": subjects.prefix,
            },
            service_id=self.instance,
        )
        self._rpc_endpoint: Endpoint | None = None
        if fast_path:
            self._rpc_endpoint = self.service.add_endpoint(
                "rpc",
                subject=subjects.rpc(agent.type),
                queue_group=agent.type,
                metadata={"message_types": ",".join(sorted(agent.routes))},
            )
        self._registered = False
        self._tracer = tracer or telemetry.tracer()
        self._span_name = f"process {agent.type}"

    def _consumers(self) -> list[DurableSpec]:
        return consumer_specs(self.agent, self.agent_id.key, self.subjects)

    async def __aenter__(self) -> RunningAgent:
        state = await ensure_event_stream(self._nc, self._stream)
        self._server_version = state.server_version
        await self._pubacks.start()
        try:
            await self._start()
        except BaseException:
            await self.close(grace=0)
            raise
        log.info("agent %s started", self.agent_id)
        return self

    async def _start(self) -> None:
        # Registered (and beating) before the first message is taken, so the log never shows
        # effects of an instance it has not seen register.
        await self.registration.start()
        self._registered = True
        for spec in self._consumers():
            await ensure_durable(self._nc, spec)
            queue, batch = self._lane(spec)
            loop = PullLoop(self._nc, spec.stream, spec.name, batch=batch, queue=queue)
            self._loops[spec.name] = loop
            await loop.start()
        for index in range(self.agent.concurrency):
            self._tasks.append(
                asyncio.create_task(self._work(), name=f"newfuse-agent-{self.agent_id}-{index}")
            )
        if self._fast_path:
            self._rpc = await self._nc.subscribe(
                self.subjects.rpc(self.agent.type), queue=self.agent.type, cb=self._on_call
            )
        await self.service.start()

    def _lane(self, spec: DurableSpec) -> tuple[asyncio.Queue[Msg], int]:
        """Where a consumer's messages wait to be taken, and how many are pulled at once."""
        return self._queue, self.agent.concurrency * 4

    async def _take(self) -> Msg:
        """The next message to handle (waits until one comes)."""
        return await self._queue.get()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, *, grace: float | None = None) -> None:
        """Stop pulling; let the handlers running finish (at most `grace` seconds, default
        ack_wait) and store their effects; hand messages not started back to the server at
        once (nak); then say stopped (last heartbeat) and deregister in the log. Idempotent."""
        await self.service.stop()
        if self._rpc is not None:
            with contextlib.suppress(Exception):
                await self._rpc.unsubscribe()
            self._rpc = None
        for loop in self._loops.values():
            await loop.close()
        self._loops.clear()
        self._stopping = True
        while not self._queue.empty():
            with contextlib.suppress(Exception):
                await self._queue.get_nowait().nak()
        if self._busy:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.agent.ack_wait if grace is None else grace):
                    await self._idle.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._records.flush()  # a clean stop loses no model record in flight
        await self._denials.close()  # the refusals counted since the last event
        if self._registered:
            self._registered = False
            await self.registration.stop()
        await self._pubacks.close()
        if self._own_store:
            with contextlib.suppress(Exception):
                await self._store.close()

    async def _work(self) -> None:
        # This task inherited the context of whoever started the agent: what it stores outside
        # a message's span (a dead letter of a body that is not a message) is in no trace.
        otel_context.attach(otel_context.Context())
        while True:
            msg = await self._take()
            if self._stopping:
                with contextlib.suppress(Exception):
                    await msg.nak()
                continue
            consumer = msg.metadata.consumer or ""
            loop = self._loops.get(consumer)
            if loop is not None:
                await loop.taken()
            self._busy += 1
            self._idle.clear()
            try:
                await self._deliver(msg, consumer)
            except asyncio.CancelledError:
                raise
            except Exception:  # the bus failed us (not the handler): try again later
                log.exception(
                    "agent %s: delivery of %s failed; redelivering", self.agent_id, msg.subject
                )
                with contextlib.suppress(Exception):
                    await msg.nak(delay=self._backoff(msg.metadata.num_delivered))
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    # -- one delivery ----------------------------------------------------------------------------

    async def _deliver(self, msg: Msg, consumer: str) -> None:
        meta = msg.metadata
        position, attempt = meta.sequence.stream, meta.num_delivered
        where = f"at position {position} on {msg.subject}"
        try:
            envelope, message = wire.decode(
                msg.data, where, registry=self.agent.registry, accepts=self.agent.protocols
            )
        except ProtocolVersionError as error:  # not handled, not retried; a requester is told
            log.warning("agent %s: %s", self.agent_id, error)
            refused = wire.refused(msg.data, where)
            answer = {"protocol_version": error.version, "accepted": error.accepted}
            await self._dead_letter(
                msg,
                consumer,
                refused[0] if refused else None,
                refused[1] if refused else None,
                attempt,
                str(error),
                answer,
            )
            return
        except FuseError as error:  # hostile or broken: reported, dead-lettered, never retried
            log.warning("agent %s: %s", self.agent_id, error)
            await self._dead_letter(msg, consumer, None, None, attempt, str(error))
            return
        who = self._sender(msg, message)
        if who.unverified is None and not self._accepts(who, envelope, message):
            await self._deny(msg, consumer, envelope, message, who)
            return
        hostile = who.unverified or who.forged
        if hostile is not None:  # refused like a hostile message: a dead letter says why
            log.warning("agent %s: %s: %s", self.agent_id, where, hostile)
            await self._dead_letter(msg, consumer, envelope, message, attempt, hostile)
            return
        with self._span(msg, envelope, message, consumer, attempt, position) as span:
            async with self._one_copy_at_a_time(envelope, message):
                await self._handle(msg, consumer, envelope, message, span)

    def _sender(self, msg: Msg, message: A2AMessage) -> _Sender:
        """Who sent `msg`: the identity that signed it, checked against the sender it claims,
        where this connection trusts an admin; else the sender it claims. Admins and services
        may send as anyone (a person answering a task through the CLI, an orchestrator for its
        saga), so for them the policy checks the claimed sender."""
        claimed = message.metadata.sender
        trust = trust_of(self._nc)
        if trust is None:
            return _Sender(claimed, sender_type(claimed))
        try:
            holder = trust.sender(msg.subject, msg.data, msg.headers)
        except SenderError as error:
            return _Sender(claimed, "", unverified=f"sender {claimed!r} not verified: {error}")
        if holder.role in ("admin", "service"):
            return _Sender(holder.name, sender_type(claimed))
        agent_type = sender_type(holder.agent) or holder.name
        forged = None
        if claimed not in {holder.name, holder.agent, agent_type} - {""}:
            forged = f"forged sender: the message says {claimed!r}, but {holder.name!r} signed it"
        return _Sender(holder.name, agent_type, forged=forged)

    def _policy_type(self, envelope: Envelope, message: A2AMessage) -> str:
        """What the policy checks a message's sender may send: its type (a queue worker's: the
        task's kind, agents/queues.py)."""
        return message.type

    def _accepts(self, who: _Sender, envelope: Envelope, message: A2AMessage) -> bool:
        policy = self.agent.policy
        return policy is None or policy.allows(who.type, self._policy_type(envelope, message))

    def _denial(
        self, who: _Sender, envelope: Envelope, message: A2AMessage, subject: str
    ) -> MessageDeniedError:
        """Count a message the policy denies (a bounded `permission.denied`) and say why."""
        self.denied += 1
        denied_type = self._policy_type(envelope, message)
        self._denials.record(
            identity=who.identity, operation="send", subject=subject, message_type=denied_type
        )
        policy = self.agent.policy
        reason = policy.refusal(who.type) if policy is not None else ""
        log.debug("agent %s: denied %r from %r", self.agent_id, denied_type, who.identity)
        return MessageDeniedError(
            sender=who.identity, message_type=denied_type, receiver=self.agent.type, reason=reason
        )

    async def _deny(
        self, msg: Msg, consumer: str, envelope: Envelope, message: A2AMessage, who: _Sender
    ) -> None:
        """Refuse a message the policy does not accept: not handled, acked (a redelivery would
        be refused again), and what `_give_up` stores besides a dead letter (a requester's
        answer `<type>.error` saying so; a queued task's `failed`). No dead letter: replaying
        it would be refused again, and a flood would flood them."""
        denied = self._denial(who, envelope, message, msg.subject)
        position, attempt = msg.metadata.sequence.stream, msg.metadata.num_delivered
        ctx = self._context(
            msg, envelope, message, consumer=consumer, attempt=attempt, position=position
        )
        self._give_up(ctx, denied.error, _denied_facts(denied))
        await self._commit(ctx._effects, consumer, position, attempt)
        await self._ack(msg)

    async def _handle(
        self, msg: Msg, consumer: str, envelope: Envelope, message: A2AMessage, span: trace.Span
    ) -> None:
        position, attempt = msg.metadata.sequence.stream, msg.metadata.num_delivered
        if attempt > self.agent.max_attempts:
            await self._dead_letter(
                msg,
                consumer,
                envelope,
                message,
                attempt - 1,
                f"delivered {attempt - 1} times without an outcome (did the handler's process "
                f"die each time?)",
            )
            return
        if attempt > 1 and await self._direct.last_for(
            self.subjects.handled(consumer, position), "look up a handled marker"
        ):
            self.already_handled += 1
            await self._ack(msg)  # its effects are stored: only the ack was lost
            return
        if await self._answered_once(envelope, message, position, attempt):
            self.already_handled += 1
            await self._ack(msg)  # a copy of a request asked once, answered already
            return
        route = self.agent.routes.get(message.type)
        if route is None:
            known = ", ".join(sorted(self.agent.routes)) or "none"
            await self._dead_letter(
                msg,
                consumer,
                envelope,
                message,
                attempt,
                f"agent type {self.agent.type!r} has no handler for {message.type!r} "
                f"(it handles {known})",
            )
            return
        opened: A2AMessage | None = None
        redacted: tuple[str, ...] = ()
        # one substring search for every other message
        if sealing.SEALED_MARK in msg.data and sealing.holds_sealed(message):
            try:
                opened, redacted = await sealing.open_message(
                    self._keys,
                    message,
                    event_id=envelope.id,
                    position=position,
                    payload_type=route.payload,
                )
            except FuseError as error:  # never handled with fields it could not open
                reason = f"{type(error).__name__}: {error}"
                _failed(span, error, reason)
                log.warning("agent %s: %s: %s", self.agent_id, msg.subject, reason)
                if error.retryable and attempt < self._open_attempts(envelope):
                    await msg.nak(delay=self._backoff(attempt))
                    return
                await self._dead_letter(msg, consumer, envelope, message, attempt, reason)
                return
        ctx = self._context(
            msg, envelope, message, consumer=consumer, attempt=attempt, position=position
        )
        if opened is not None:
            ctx._opened, ctx.redacted = opened.payload, redacted
        started = time.monotonic()
        try:
            await self._call(route, ctx, msg)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # Its model records are stored before its failure is (a ModelRecordError here
            # fails the delivery: the message comes back).
            await self._records.settle(ctx._records)
            retryable = not isinstance(error, FuseError) or error.retryable
            reason = f"{type(error).__name__}: {error}"
            _failed(span, error, reason)
            if retryable and attempt < self.agent.max_attempts:
                await msg.nak(delay=self._backoff(attempt))
                return
            await self._dead_letter(msg, consumer, envelope, message, attempt, reason)
            return
        await self._records.settle(ctx._records)  # every record before the outcome
        if time.monotonic() - started > self.agent.ack_wait:
            # It ran past ack_wait: if its process stalled (no in-progress acks went out), the
            # server redelivered it, maybe to another instance that has finished it since.
            attempt = max(attempt, 2)
            if await self._direct.last_for(
                self.subjects.handled(consumer, position), "look up a handled marker"
            ):
                self.already_handled += 1
                await self._ack(msg)
                return
        await self._commit(ctx._effects, consumer, position, attempt, marker=bool(ctx._records))
        self.handled += 1
        await self._ack(msg)

    def _open_attempts(self, envelope: Envelope) -> int:
        """Deliveries of a message whose sealed values the key service could not open
        (unavailable, busy) before it is given up."""
        return self.agent.max_attempts

    @contextlib.asynccontextmanager
    async def _one_copy_at_a_time(
        self, envelope: Envelope, message: A2AMessage
    ) -> AsyncIterator[None]:
        """For a request asked once (AgentClient.request_once), wait until no other copy of it
        is being handled here: copies pulled together are then answered once."""
        if not _asked_once(message):
            yield
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.agent.ack_wait):  # the other may hang: not forever
                while (busy := self._once_busy.get(envelope.id)) is not None:
                    await busy.wait()
        if envelope.id in self._once_busy:  # it still runs: the answered check decides alone
            yield
            return
        done = self._once_busy[envelope.id] = asyncio.Event()
        try:
            yield
        finally:
            del self._once_busy[envelope.id]
            done.set()

    async def _answered_once(
        self, envelope: Envelope, message: A2AMessage, position: int, attempt: int
    ) -> bool:
        """Whether `message` is a copy of a request asked once per key (AgentClient.
        request_once) that another copy answered already: stored again after the duplicate
        window, it is not handled twice. The answer is another copy's when this one is
        delivered for the first time, or when it was stored before this one. (A redelivery of
        the copy that was answered takes the usual path, which also stores any of its effects
        that are missing.)"""
        token = message.reply_to
        if token is None or not token.startswith(wire.ONCE_PREFIX):
            return False
        try:
            subject = self.subjects.reply(check_token(token, kind="reply token"))
        except FuseError:
            return False  # not a token we made: handled as any request
        last = await self._direct.last_for(subject, "look up a request's reply")
        if last is None:
            return False
        try:
            _, reply = wire.decode(last.data, f"the last message on {subject}")
        except FuseError:
            return False
        return reply.in_reply_to == envelope.id and (attempt == 1 or sequence_of(last) < position)

    def _span(
        self,
        msg: Msg,
        envelope: Envelope,
        message: A2AMessage,
        consumer: str,
        attempt: int,
        position: int,
    ) -> AbstractContextManager[trace.Span]:
        """The CONSUMER span of one handled message, current while it runs: its parent is the
        message's trace context (headers first, then the envelope's), never the caller's.
        Without a recording tracer and a trace context to pass on, no span at all."""
        carried = envelope.trace
        parent = telemetry.remote_parent(
            msg.headers,
            carried.traceparent if carried is not None else None,
            carried.tracestate if carried is not None else None,
        )
        if parent is None:
            if telemetry.records_nothing(self._tracer) and not telemetry.in_span():
                return _UNTRACED
            parent = otel_context.Context()  # a new trace, not the span that started us
        attributes: dict[str, str | int] = {
            telemetry.MESSAGING_SYSTEM: telemetry.SYSTEM_NATS,
            telemetry.MESSAGING_OPERATION_TYPE: "process",
            telemetry.MESSAGING_OPERATION_NAME: "process",
            telemetry.MESSAGING_DESTINATION_NAME: msg.subject,
            telemetry.MESSAGING_CONSUMER_GROUP_NAME: consumer,
            telemetry.MESSAGING_MESSAGE_ID: envelope.id,
            telemetry.NEWFUSE_DELIVERY_COUNT: attempt,
            telemetry.NEWFUSE_POSITION: position,
            telemetry.NEWFUSE_AGENT_ID: str(self.agent_id),
            telemetry.NEWFUSE_MESSAGE_TYPE: message.type,
        }
        if message.context_id is not None:
            attributes[telemetry.MESSAGING_MESSAGE_CONVERSATION_ID] = message.context_id
        return self._tracer.start_as_current_span(
            self._span_name, context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
        )

    def _backoff(self, attempt: int) -> float:
        first, most = self.agent.backoff
        return backoff(attempt, first=first, most=most)

    async def _call(self, route: _Route, ctx: Context, msg: Msg | None) -> None:
        beat = None
        if msg is not None:
            beat = asyncio.create_task(self._in_progress(msg))
        try:
            await run_handler(route, ctx)
        finally:
            if beat is not None:
                beat.cancel()

    async def _in_progress(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.agent.ack_wait / 3)
            with contextlib.suppress(NatsError):
                await msg.in_progress()

    async def _commit(
        self,
        effects: list[Effect],
        consumer: str,
        position: int,
        attempt: int = 1,
        *,
        marker: bool = False,
    ) -> None:
        """Store `effects`, then the handled marker (also with no effects when `marker`: the
        handler stored model records meanwhile, and a redelivery must not run it again)."""
        if not effects and not marker:
            return
        if position == 0:  # the fast path: delivered once, nothing to redeliver
            for subject, body, wire_headers in effects:
                await self._nc.publish(subject, body, headers=wire_headers)
            return
        if attempt > 1:  # an earlier delivery may have stored some before it died
            effects = await self._missing(effects, position)
        await asyncio.gather(*(self._publish(*effect) for effect in effects))
        first = {headers.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}
        try:
            await self._publish(self.subjects.handled(consumer, position), b"", first)
        except WrongLastSequenceError:
            pass  # another delivery of this message got there first; ids kept effects single

    async def _publish(self, subject: str, body: bytes, wire_headers: dict[str, str]) -> None:
        """Store one message (its PubAck awaited), riding out a leader election or reconnect
        for `election_timeout` seconds while it is certainly not stored: no stream answered
        (503), or one refused it for now (no leader). An answer that did not come in time
        (PublishTimeoutError) is not sent again here: the message may be stored, and past the
        duplicate window a repeat would be stored twice; the delivery fails, and its
        redelivery stores only what is missing (`_missing`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.agent.election_timeout
        pause = 0.05
        while True:
            try:
                answer = await self._pubacks.request(
                    subject, body, wire_headers, self._publish_timeout
                )
                decode_pub_ack(answer, subject=subject, server_version=self._server_version)
                return
            except PublishTimeoutError:
                raise
            except FuseError as error:
                if not error.retryable or self._pubacks.closed or loop.time() >= deadline:
                    raise
                log.debug("agent %s: %s; trying again", self.agent_id, error)
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
            pause = min(pause * 2, 0.5)

    async def _missing(self, effects: list[Effect], position: int) -> list[Effect]:
        """The effects whose ids are not yet stored on their subjects after `position`.

        An identity that may read only its own subjects (`fuse auth`: an agent's) cannot scan
        them: it sends all again and relies on the stream's duplicate window (2 minutes by
        default; a redelivery comes after `ack_wait`, 30 s by default) to store each once."""
        if reads_own_subjects_only(self._nc):
            return effects
        wanted: dict[str, set[str]] = {}
        for subject, _, wire_headers in effects:
            wanted.setdefault(subject, set()).add(wire_headers[headers.MSG_ID])
        found: set[str] = set()
        for subject, ids in wanted.items():
            async for msg in self._direct.messages(subject, "find stored effects", position + 1):
                msg_id = (msg.headers or {}).get(headers.MSG_ID)
                if msg_id in ids:
                    found.add(msg_id)
        return [effect for effect in effects if effect[2][headers.MSG_ID] not in found]

    async def _ack(self, msg: Msg) -> None:
        await msg.ack()

    def _provider_for(self, provider: ModelProvider) -> tuple[ModelProvider, str | None]:
        return provider, None

    async def _store_record(self, ctx: Context, effect: Effect, call: int) -> bool:
        if ctx.position == 0:  # the fast path: delivered once, its records go with its effects
            return False
        ctx._records.append(await self._records.put(*effect, call))
        return True

    async def _dead_letter(
        self,
        msg: Msg,
        consumer: str,
        envelope: Envelope | None,
        message: A2AMessage | None,
        attempts: int,
        error: str,
        answer: dict[str, Any] | None = None,
    ) -> None:
        """Store the dead letter (and the error reply a requester waits for: `{error}` plus
        `answer`) once, then term."""
        position = msg.metadata.sequence.stream
        message_id = envelope.id if envelope is not None else f"position-{position}"
        letter = DeadLetter(
            consumer=consumer,
            subject=msg.subject,
            position=position,
            message_id=envelope.id if envelope is not None else None,
            message_type=message.type if message is not None else None,
            attempts=attempts,
            error=error,
        )
        letter_id = wire.derived_id(message_id, consumer, "dead-letter")
        body, wire_headers = wire.encode(
            f"deadletter.{consumer}",
            "agent.dead_letter",
            letter,
            event_id=letter_id,
            causation_id=envelope.id if envelope is not None else None,
            trace=wire.current_trace(),
        )
        effects: list[Effect] = [(self.subjects.dead_letters(consumer), body, wire_headers)]
        if envelope is not None and message is not None:
            ctx = self._context(
                msg, envelope, message, consumer=consumer, attempt=attempts, position=position
            )
            self._give_up(ctx, error, answer)
            effects.extend(ctx._effects)
        await self._commit(effects, consumer, position, attempts + 1)
        self.dead_lettered += 1
        log.warning("agent %s: dead letter %s: %s", self.agent_id, message_id, error)
        await msg.term()

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
        """What the handler of `msg` (or what gives it up) sees: a `_context_class`."""
        return self._context_class(
            self, envelope, message, consumer=consumer, attempt=attempt, position=position
        )

    def _give_up(self, ctx: Context, error: str, answer: dict[str, Any] | None = None) -> None:
        """What a dead letter stores besides the letter: the error reply a requester waits for
        (`{error}` plus `answer`)."""
        ctx._reply({"error": error, **(answer or {})}, f"{ctx.message.type}.error")

    # -- the fast path ---------------------------------------------------------------------------

    async def _on_call(self, msg: Msg) -> None:
        started = time.perf_counter_ns()
        try:
            envelope, message = wire.decode(
                msg.data,
                f"on {msg.subject}",
                registry=self.agent.registry,
                accepts=self.agent.protocols,
            )
        except Exception as error:  # the caller's mistake
            await self._refuse_call(msg, error, started, "400")
            return
        with self._span(msg, envelope, message, self.agent.type, 1, 0) as span:
            await self._answer_call(msg, envelope, message, span, started)

    async def _refuse_call(self, msg: Msg, error: Exception, started: int, code: str) -> None:
        text = f"{type(error).__name__}: {error}"
        if self._rpc_endpoint is not None:
            self._rpc_endpoint.record(time.perf_counter_ns() - started, text)
        if msg.reply:  # ADR-32: an error answer says so in two headers
            one_line = " ".join(text.split())[:1024]
            answer: dict[str, Any] = {"error": text}
            if isinstance(error, MessageDeniedError):
                answer = {"error": error.error, **_denied_facts(error)}
            with contextlib.suppress(Exception):
                await self._nc.publish(
                    msg.reply,
                    msgspec.json.encode(answer),
                    headers={ERROR_HEADER: one_line, ERROR_CODE_HEADER: code},
                )

    async def _answer_call(
        self, msg: Msg, envelope: Envelope, message: A2AMessage, span: trace.Span, started: int
    ) -> None:
        code = "400"  # until the request is understood, a failure is the caller's
        if self.agent.policy is not None:  # (no policy: no sender check, as before policies)
            who = self._sender(msg, message)
            if who.unverified is None and not self._accepts(who, envelope, message):
                await self._refuse_call(
                    msg, self._denial(who, envelope, message, msg.subject), started, "403"
                )
                return
            if who.unverified or who.forged:
                await self._refuse_call(
                    msg, PermissionError(who.unverified or who.forged), started, "403"
                )
                return
        try:
            route = self.agent.routes.get(message.type)
            if route is None:
                raise HandlerRegistrationError(
                    agent=self.agent.type, message_type=message.type, reason="no such handler"
                )
            ctx = Context(self, envelope, message, consumer=self.agent.type, attempt=1, position=0)
            code = "500"
            await self._call(route, ctx, None)
        except Exception as error:
            _failed(span, error, f"{type(error).__name__}: {error}")
            await self._refuse_call(msg, error, started, code)
            return
        replies = [effect for effect in ctx._effects if effect[0] == self.subjects.reply("_call")]
        await self._commit([e for e in ctx._effects if e not in replies], self.agent.type, 0)
        self.handled += 1
        if self._rpc_endpoint is not None:
            self._rpc_endpoint.record(time.perf_counter_ns() - started)
        await msg.respond(replies[0][1] if replies else b"{}")
