"""Talking to agents from outside one: send, publish, request through the log, the fast path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from opentelemetry import trace

from newfuse import telemetry
from newfuse.agents import sealing, wire
from newfuse.agents.address import AgentId, check_agent_name
from newfuse.agents.tasks import read_task, task_id_for
from newfuse.errors import (
    AgentClosedError,
    FuseError,
    InvalidPayloadError,
    KeyServiceError,
    MessageDeniedError,
    RequestFailedError,
    RequestTimeoutError,
    TaskAnswerRefusedError,
    TaskNotFoundError,
)
from newfuse.nats import headers
from newfuse.nats.connection import identity_of
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.jserrors import PubAck, decode_pub_ack
from newfuse.nats.micro import ERROR_HEADER
from newfuse.nats.provision import MessageStreamSpec, ensure_event_stream
from newfuse.nats.publish import PubAckInbox
from newfuse.nats.signing import signed
from newfuse.nats.subjects import Subjects
from newfuse.reliability import CircuitBreaker, RetryPolicy
from newfuse.schemas import (
    TERMINAL_STATES,
    A2AMessage,
    A2AMetadata,
    Part,
    TraceContext,
    new_event_id,
)
from newfuse.security.key_service import KeyServiceClient

log = logging.getLogger(__name__)

FAST_PATH_TOKEN = "_call"
_TRACE_HEADERS: Final = frozenset({headers.TRACEPARENT, headers.TRACESTATE})
"""`replyTo` of a fast-path call: the reply comes back as the core NATS response."""


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's answer to a request: its message type, payload, the whole message and, for
    a reply through the log, its event id on the message stream.

    A reply that `request` or `request_once` returns has its sealed values opened by the key
    service in `payload` (null once their subject is forgotten, listed in `redacted`);
    `message` stays as stored. One given to `on_unclaimed_reply` callbacks is as stored.
    """

    type: str
    payload: dict[str, Any]
    message: A2AMessage | None = None
    event_id: str | None = None
    redacted: tuple[str, ...] = ()


UnclaimedReply = Callable[[Reply], None]
"""Called with a reply through the log that no request waits for (any more)."""


class TaskAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """An answer sent to a task: its message id, where it went, its type and stream position;
    `duplicate` when the same answer was stored already (answered twice)."""

    message_id: str
    to: str
    message_type: str
    position: int
    duplicate: bool = False


class AgentClient:
    """Sends A2A messages as `sender` (an async context manager over a connected client).

    Every send waits for JetStream's PubAck (the message is stored) and carries
    `Nats-Msg-Id` = message id, so a retried send is stored once within the duplicate window.
    Each send, publish, request, call and answer is a PRODUCER span (`send <stream>`; a request
    or call until its reply), child of the current span, whose W3C trace context the message
    carries in its headers and envelope; `tracer` defaults to newfuse's global one.
    """

    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = "fuse",
        sender: str = "client",
        stream: MessageStreamSpec | None = None,
        timeout: float = 5.0,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.subjects = Subjects(prefix)
        self.sender = sender
        self._nc = nc
        self._stream = stream or MessageStreamSpec(subjects=self.subjects)
        self._timeout = timeout
        self._inbox = PubAckInbox(nc, f"agent client {sender!r}")
        self._direct = DirectGet(nc, self.subjects.message_stream_name, timeout=timeout)
        # an identity may read only its own replies (`fuse auth`): its name is the token
        self._token = identity_of(nc) or uuid.uuid4().hex[:12]
        self._keys = KeyServiceClient(
            nc, prefix=prefix, requester=identity_of(nc) or sender, timeout=timeout
        )
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._replies: Subscription | None = None
        self._unclaimed: list[UnclaimedReply] = []
        self._closed = False
        self._tracer = tracer or telemetry.tracer()

    async def __aenter__(self) -> AgentClient:
        await ensure_event_stream(self._nc, self._stream)
        await self._inbox.start()
        self._replies = await self._nc.subscribe(
            self.subjects.reply(self._token), cb=self._on_reply
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop waiting for replies and close the PubAck inbox. Idempotent."""
        self._closed = True
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        if self._replies is not None:
            try:
                await self._replies.unsubscribe()
            except NatsError:
                pass  # the connection is gone: nothing to unsubscribe from
            self._replies = None
        await self._inbox.close()

    def on_unclaimed_reply(self, callback: UnclaimedReply) -> Callable[[], None]:
        """Call `callback` with every reply that comes when no request waits for it (it came
        after its request timed out or was given up); returns what removes the callback.
        A callback that raises is logged and kept."""
        self._unclaimed.append(callback)
        return lambda: self._unclaimed.remove(callback) if callback in self._unclaimed else None

    async def _on_reply(self, msg: Msg) -> None:
        try:
            envelope, message = wire.decode(msg.data, f"on {msg.subject}")
        except FuseError:
            return  # not a reply of ours; the stream keeps it for audit
        reply = Reply(
            type=message.type, payload=message.payload, message=message, event_id=envelope.id
        )
        future = self._waiting.pop(message.in_reply_to or "", None)
        if future is not None and not future.done():
            future.set_result(reply)
            return
        for callback in list(self._unclaimed):
            try:
                callback(reply)
            except Exception:
                log.exception("agent client %r: an unclaimed-reply callback failed", self.sender)

    async def _opened(self, reply: Reply, token: str, *, after: int) -> Reply:
        """`reply` (on the reply subject of `token`, stored after position `after`) with its
        sealed values opened by the key service, from the stored copy: a form check for any
        other reply. A reply heard on core NATS may not be stored yet: not found (404), it is
        asked for again within the client's timeout.

        Raises:
            KeyServiceUnavailableError: no key service answered (never silent redaction).
            KeyServiceRefusedError, KeyServiceError: it refused (a value that does not open
                is 422).
        """
        message = reply.message
        if message is None or reply.event_id is None or not sealing.holds_sealed(message):
            return reply
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + self._timeout, 0.01
        while True:
            try:
                opened, redacted = await sealing.open_message(
                    self._keys,
                    message,
                    event_id=reply.event_id,
                    position=after,
                    payload_type=None,
                    subject=self.subjects.reply(token),
                    requester=identity_of(self._nc) or token,  # without identities: its token
                )
            except KeyServiceError as error:
                if error.code != 404 or loop.time() + pause >= deadline:
                    raise
            else:
                return msgspec.structs.replace(reply, payload=opened.payload, redacted=redacted)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)

    def _address(self, to: AgentId | str) -> tuple[str, str]:
        if isinstance(to, AgentId):
            return self.subjects.agent_instance(to.type, to.key), f"a2a.{to.type}"
        return self.subjects.agent_type(check_agent_name(to, kind="agent type")), f"a2a.{to}"

    def _message(
        self,
        message_type: str,
        payload: Any,
        *,
        message_id: str,
        context_id: str | None = None,
        task_id: str | None = None,
        parts: list[Part] | None = None,
        reply_to: str | None = None,
        in_reply_to: str | None = None,
    ) -> A2AMessage:
        return A2AMessage(
            type=message_type,
            payload={} if payload is None else msgspec.to_builtins(payload),
            metadata=A2AMetadata(sender=self.sender),
            message_id=message_id,
            context_id=context_id,
            task_id=task_id,
            role="user",
            parts=parts or [],
            reply_to=reply_to,
            in_reply_to=in_reply_to,
        )

    @contextlib.contextmanager
    def _producing(
        self, subject: str, stream: str, message: A2AMessage
    ) -> Iterator[TraceContext | None]:
        """A PRODUCER span for sending `message`; yields the trace context it carries (None
        when nothing records or propagates a trace)."""
        if telemetry.records_nothing(self._tracer):  # pass on the current trace, if any
            yield wire.current_trace()
            return
        attributes = {
            telemetry.MESSAGING_SYSTEM: telemetry.SYSTEM_NATS,
            telemetry.MESSAGING_OPERATION_TYPE: "send",
            telemetry.MESSAGING_OPERATION_NAME: "send",
            telemetry.MESSAGING_DESTINATION_NAME: subject,
            telemetry.MESSAGING_MESSAGE_ID: message.message_id or "",
            telemetry.NEWFUSE_MESSAGE_TYPE: message.type,
        }
        if message.context_id is not None:
            attributes[telemetry.MESSAGING_MESSAGE_CONVERSATION_ID] = message.context_id
        with self._tracer.start_as_current_span(
            f"send {stream}", kind=trace.SpanKind.PRODUCER, attributes=attributes
        ) as span:
            carried = telemetry.trace_context_of(span)
            yield (
                None
                if carried is None
                else TraceContext(traceparent=carried[0], tracestate=carried[1])
            )

    async def _store(
        self,
        subject: str,
        stream: str,
        message: A2AMessage,
        carried: TraceContext | None = None,
        payload: Any = None,
    ) -> PubAck:
        plan = sealing.plan_of(payload)
        if plan is not None:  # `payload` declares sealed fields: the key service seals them
            message = await sealing.seal_message(self._keys, message, plan, stream)
        return await self.record(
            subject,
            stream,
            wire.MESSAGE_TYPE,
            message,
            event_id=message.message_id or new_event_id(),
            correlation_id=message.context_id,
            trace=carried,
        )

    async def record(
        self,
        subject: str,
        stream: str,
        type_name: str,
        data: Any,
        *,
        event_id: str,
        correlation_id: str | None = None,
        metadata: dict[str, str] | None = None,
        trace: TraceContext | None = None,
    ) -> PubAck:
        """Store one event of `type_name` (registered types are checked) on the message
        stream at `subject`, waiting for its PubAck; the same `event_id` again within the
        duplicate window is stored once (`PubAck.duplicate`). What aggregations and other
        bookkeeping beside the messages write."""
        if self._closed:
            raise AgentClosedError(agent=f"agent client {self.sender!r}")
        body, wire_headers = wire.encode(
            stream,
            type_name,
            data,
            event_id=event_id,
            correlation_id=correlation_id,
            metadata=metadata,
            trace=trace,
        )
        answer = await self._inbox.request(subject, body, wire_headers, self._timeout)
        return decode_pub_ack(answer, subject=subject)

    async def send(
        self,
        to: AgentId | str,
        message_type: str,
        payload: Any = None,
        *,
        message_id: str | None = None,
        context_id: str | None = None,
        task_id: str | None = None,
        parts: list[Part] | None = None,
        want_reply: bool = False,
    ) -> str:
        """Store a message to one instance (AgentId) or any instance of a type (str).

        With `want_reply`, the message asks for a reply to this client; no request waits for
        it, so it goes to the `on_unclaimed_reply` callbacks (what aggregation listens to).

        Returns:
            The message id (`message_id`, or a new UUIDv7).
        """
        subject, stream = self._address(to)
        message = self._message(
            message_type,
            payload,
            message_id=message_id or new_event_id(),
            context_id=context_id,
            task_id=task_id,
            parts=parts,
            reply_to=self._token if want_reply else None,
        )
        with self._producing(subject, stream, message) as carried:
            await self._store(subject, stream, message, carried, payload)
        return message.message_id or ""

    async def publish(
        self, topic: str, message_type: str, payload: Any = None, *, message_id: str | None = None
    ) -> str:
        """Store a message to every subscriber of `topic`; returns its id."""
        check_agent_name(topic, kind="topic")
        message = self._message(message_type, payload, message_id=message_id or new_event_id())
        subject, stream = self.subjects.topic(topic), f"topic.{topic}"
        with self._producing(subject, stream, message) as carried:
            await self._store(subject, stream, message, carried, payload)
        return message.message_id or ""

    def task_id(self, to: AgentId | str, message_id: str) -> str:
        """The id of the task that the message `message_id`, sent `to` an agent without a
        task id, starts once its handler moves it (`Context.task_status`)."""
        if isinstance(to, AgentId):
            return task_id_for(message_id, f"{to.type}__{to.key}")
        return task_id_for(message_id, check_agent_name(to, kind="agent type"))

    async def answer(
        self, task_id: str, *, text: str | None = None, data: Any = None, to_type: bool = False
    ) -> TaskAnswer:
        """Answer an input-required task: a `user` message with the task's ids, sent to the
        agent instance that asked (with `to_type`, to any instance of its type), with the type
        its question names, so that type's handler continues the task.

        The answer's `inReplyTo` is the question's message id. Its own id is derived from the
        question's status event: answering one question twice stores one answer within the
        duplicate window (`TaskAnswer.duplicate`).

        Raises:
            TaskNotFoundError: the task has no events.
            TaskAnswerRefusedError: it is not input-required, or nothing says who asked.
        """
        subject = self.subjects.task_events(task_id)
        task = await read_task(self._direct, self.subjects, task_id)
        if task is None:
            raise TaskNotFoundError(task_id=task_id, subject=subject)
        question = task.question
        if question is None:
            ended = "it has ended" if task.state in TERMINAL_STATES else "it asks for nothing"
            raise TaskAnswerRefusedError(
                task_id=task_id,
                state=task.state,
                reason=f"only an input-required task takes an answer, and {ended}",
            )
        try:
            asker = AgentId.parse(question.sender or "")
        except FuseError as error:
            raise TaskAnswerRefusedError(
                task_id=task_id,
                state=task.state,
                reason=f"its status at position {question.position} names no agent that asked "
                f"({error})",
            ) from None
        asked = question.message
        if asked is None:
            raise TaskAnswerRefusedError(
                task_id=task_id,
                state=task.state,
                reason=f"its status at position {question.position} carries no question "
                "(no message, so no type to answer with)",
            )
        parts = [] if text is None else [Part(text=text)]
        if data is not None:
            parts.append(Part(data=data))
        to: AgentId | str = asker.type if to_type else asker
        address, stream = self._address(to)
        message_type = asked.type
        message = self._message(
            message_type,
            data if isinstance(data, dict) else None,
            message_id=wire.derived_id(question.id, "answer", task_id),
            context_id=task.context_id,
            task_id=task_id,
            parts=parts,
            in_reply_to=asked.message_id,
        )
        with self._producing(address, stream, message) as carried:
            ack = await self._store(address, stream, message, carried)
        return TaskAnswer(
            message_id=message.message_id or "",
            to=str(to),
            message_type=message_type,
            position=ack.seq,
            duplicate=ack.duplicate,
        )

    async def request(
        self,
        to: AgentId | str,
        message_type: str,
        payload: Any = None,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109 - how long to wait for the reply
        context_id: str | None = None,
        task_id: str | None = None,
        message_id: str | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> Reply:
        """Request through the log: the request and the reply are both stored messages.

        Args:
            timeout: how long one attempt waits for the reply.
            message_id: the request's id (default: a new UUIDv7).
            retry: try again on what it retries (a timeout, an unavailable store), within its
                deadline. Every attempt sends the same message id: within the stream's
                duplicate window a resend is stored once and the attempt waits again for the
                reply; after it, the agent sees a redelivery, whose effects are keyed by the
                message and so happen once.
            breaker: refuse at once (CircuitOpenError) while `to` keeps failing; each attempt
                goes through it.

        Raises:
            RequestTimeoutError: no reply within `timeout` (names agent, type, time waited).
            RequestFailedError: the agent gave up on the request (its dead letter's error);
                MessageDeniedError (a subclass) when its policy does not accept the request.
            RetriesExhaustedError: with `retry`, every attempt failed (the last error is its
                cause).
            CircuitOpenError: with `breaker`, the circuit is open.
        """
        subject, stream = self._address(to)
        message = self._message(
            message_type,
            payload,
            message_id=message_id or new_event_id(),
            context_id=context_id,
            task_id=task_id,
            reply_to=self._token,
        )
        request_id = message.message_id or ""
        # One future across attempts: a reply that comes between two attempts is still taken.
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future

        async def once(carried: TraceContext | None) -> Reply:
            started = time.monotonic()
            try:
                ack = await self._store(subject, stream, message, carried, payload)
                async with asyncio.timeout(max(0.0, timeout - (time.monotonic() - started))):
                    reply = await asyncio.shield(future)
            except TimeoutError:
                raise RequestTimeoutError(
                    agent=str(to), message_type=message_type, waited=timeout, path="through the log"
                ) from None
            reply = await self._opened(reply, self._token, after=ack.seq)
            return _answered(reply, to, message_type)  # a failure raises, for the breaker too

        # One PRODUCER span for the request until its reply, however many attempts it takes.
        with self._producing(subject, stream, message) as carried:

            async def attempt() -> Reply:
                if breaker is None:
                    return await once(carried)
                return await breaker.call(lambda: once(carried))

            try:
                if retry is None:
                    return await attempt()
                operation = f"request {message_type!r} to {str(to)!r}"
                return await retry.run(attempt, operation=operation)
            finally:
                if self._waiting.get(request_id) is future:
                    del self._waiting[request_id]
                future.cancel()

    async def request_once(
        self,
        to: AgentId | str,
        message_type: str,
        payload: Any = None,
        *,
        key: str,
        timeout: float = 10.0,  # noqa: ASYNC109 - how long to wait for the reply
        context_id: str | None = None,
    ) -> Reply:
        """A request through the log asked at most once for `key` (a saga step's idempotency
        key), however often and wherever it is called again.

        Its message id and its reply token are derived from `key`. A call first looks for the
        reply on the token's subject: when an earlier call (another process's, before a crash)
        got one, that is the answer, and nothing is sent. Otherwise it sends the request with
        the same message id (stored once within the stream's duplicate window; a later copy
        is not handled by a runtime that finds the request answered) and waits for the reply.

        Raises:
            RequestTimeoutError: no reply within `timeout` (calling again waits again; the
                request is not asked twice).
            RequestFailedError: the agent gave up on the request (calling again finds the same
                answer).
        """
        subject, stream = self._address(to)
        message_id, token = wire.once_ids(key)
        replies = self.subjects.reply(token)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def take(body: bytes, where: str) -> None:
            try:
                envelope, message = wire.decode(body, where)
            except FuseError as error:  # not an answer: the stream keeps it for audit
                log.warning("agent client %r: %s", self.sender, error)
                return
            if message.in_reply_to == message_id and not future.done():
                future.set_result(
                    Reply(
                        type=message.type,
                        payload=message.payload,
                        message=message,
                        event_id=envelope.id,
                    )
                )

        async def on_reply(msg: Msg) -> None:
            take(msg.data, f"on {msg.subject}")

        # subscribed before the look, so a reply stored in between is not missed
        subscription = await self._nc.subscribe(replies, cb=on_reply)
        try:
            earlier = await self._direct.last_for(replies, "look up an earlier reply")
            after = 1
            if earlier is not None:
                take(earlier.data, f"the last message on {replies}")
                after = sequence_of(earlier)
            if not future.done():
                message = self._message(
                    message_type,
                    payload,
                    message_id=message_id,
                    context_id=context_id,
                    reply_to=token,
                )
                with self._producing(subject, stream, message) as carried:
                    after = (await self._store(subject, stream, message, carried, payload)).seq
            try:
                async with asyncio.timeout(timeout):
                    reply = await future
            except TimeoutError:
                raise RequestTimeoutError(
                    agent=str(to), message_type=message_type, waited=timeout, path="through the log"
                ) from None
            return _answered(await self._opened(reply, token, after=after), to, message_type)
        finally:
            with contextlib.suppress(NatsError):
                await subscription.unsubscribe()

    async def call(
        self,
        agent_type: str,
        message_type: str,
        payload: Any = None,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - how long to wait for the answer
    ) -> Reply:
        """The fast path: core NATS request/reply to any instance of `agent_type`, nothing
        stored (explicit opt-in: a call is lost if no instance is up).

        Raises:
            RequestTimeoutError: no answer within `timeout`, or no instance listens.
            RequestFailedError: the handler failed; MessageDeniedError (a subclass) when the
                agent's policy does not accept the request.
        """
        check_agent_name(agent_type, kind="agent type")
        if sealing.plan_of(payload) is not None:
            raise InvalidPayloadError(
                type_name=message_type,
                version=1,
                path="$.payload",
                reason="it has sealed fields, which travel through the log only: use "
                "`request` (a call stores nothing the key service could open)",
            )
        message_id = new_event_id()
        message = self._message(
            message_type, payload, message_id=message_id, reply_to=FAST_PATH_TOKEN
        )
        subject, stream = self.subjects.rpc(agent_type), f"a2a.{agent_type}"
        with self._producing(subject, stream, message) as carried:
            body, wire_headers = wire.encode(
                stream, wire.MESSAGE_TYPE, message, event_id=message_id, trace=carried
            )
            # on core NATS the headers would only repeat the envelope (no stream dedupes by
            # them): a call carries just the trace context, when there is one
            carried_headers = {k: v for k, v in wire_headers.items() if k in _TRACE_HEADERS}
            try:
                # signed like a stored message, so a receiver with a policy knows who asks
                answer = await self._nc.request(
                    subject,
                    body,
                    timeout=timeout,
                    headers=signed(self._nc, subject, body, carried_headers) or None,
                )
            except (NoRespondersError, NatsError):
                raise RequestTimeoutError(
                    agent=agent_type, message_type=message_type, waited=timeout, path="fast path"
                ) from None
            refused = (answer.headers or {}).get(ERROR_HEADER) is not None
            if refused or answer.data.startswith(b'{"error"'):  # ADR-32's error answer
                decoded = msgspec.json.decode(answer.data)
                if isinstance(decoded, dict) and "error" in decoded and "type" not in decoded:
                    raise _failure(agent_type, message_type, decoded)
        _, reply = wire.decode(answer.data, f"fast-path answer of {agent_type!r}")
        return Reply(type=reply.type, payload=reply.payload, message=reply)


def _answered(reply: Reply, to: AgentId | str, message_type: str) -> Reply:
    """`reply`, unless it is the agent's error answer (`<type>.error`): RequestFailedError."""
    if reply.type == f"{message_type}.error":
        raise _failure(str(to), message_type, reply.payload, reply.event_id)
    return reply


def _failure(
    agent: str, message_type: str, answer: dict[str, Any], reply_id: str | None = None
) -> RequestFailedError:
    """The error an error answer stands for: MessageDeniedError when the receiver's policy
    denied the request (the answer's `denied` says who and why), else RequestFailedError."""
    denied = answer.get("denied")
    if isinstance(denied, dict):
        return MessageDeniedError(
            sender=str(denied.get("sender", "")),
            message_type=message_type,
            receiver=str(denied.get("receiver", agent)),
            reason=str(denied.get("reason", "")),
            reply_id=reply_id,
        )
    return RequestFailedError(
        agent=agent, message_type=message_type, error=str(answer.get("error")), reply_id=reply_id
    )
