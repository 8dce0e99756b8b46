"""Every model call as a span and a `model.invoked` record: where records go, and reading them.

`RecordedModel` wraps a provider: each call is a span with the OpenTelemetry GenAI attributes
and ends in a ModelInvoked written to a `CallLog`. Inside a handler the log is the handler's
(`ctx.model(provider)`, `ctx.chat(...)`): the record is one of its effects, stored with its
other effects when it returns, with an id derived from the message handled and the call's
index, so a redelivery stores it once; and a redelivered handler whose earlier attempt's
records are stored gets their answers back instead of calling the model again.

Records are stored off the call's latency path (`RecordWriter`): a call returns as soon as the
model answered; its record is published at once and its PubAck awaited in the background, at
most `RECORDS_IN_FLIGHT` per agent instance (or recorder) unacknowledged, after which the next
record waits for room (back-pressure). A handler's outcome is committed only after every record
it made is stored (so a replay always finds them), and a record that fails makes the delivery
fail (the message comes back): a failure is never swallowed. Outside a handler,
`ModelRecorder(nc, source=...)` stores the same way; `flush()` and `close()` wait for what is
in flight and raise when a record was not stored.

Records are on the message stream, `<prefix>.a2a._model.<agent type or source>` (envelope
stream `model.<type>`), beside the conversation they belong to: a replay reads both in one
pass, and a write does not contend with any event stream's version check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from newfuse import telemetry
from newfuse.agents import wire
from newfuse.agents.address import check_agent_name
from newfuse.agents.models.base import (
    ChatChunk,
    ChatResult,
    ModelProvider,
    chunked,
    input_hash,
    params_hash,
)
from newfuse.errors import FuseError, ModelRecordError
from newfuse.nats.jserrors import decode_pub_ack
from newfuse.nats.publish import PubAckInbox
from newfuse.nats.subjects import Subjects
from newfuse.schemas import (
    ChatMessage,
    Envelope,
    ModelInvoked,
    Tool,
    new_event_id,
)

INVOKED_TYPE: Final = "model.invoked"
RECORDS_IN_FLIGHT: Final = 64
"""Records one writer (an agent instance, a ModelRecorder) has published and not yet seen
acknowledged, at most; the next waits until one is (back-pressure on the calls)."""

log = logging.getLogger("newfuse.agents.models")


Publish = Callable[[str, bytes, dict[str, str]], Awaitable[None]]


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # kept for settle(); retrieved so it is never logged as lost


class RecordWriter:
    """Stores records in the background: each is published at once and its PubAck awaited by a
    task of its own, at most `limit` unacknowledged (then `put` waits for room).

    Args:
        publish: stores one message and returns once its PubAck says so (raises a FuseError
            otherwise).
        limit: records in flight at most.
    """

    def __init__(self, publish: Publish, *, limit: int = RECORDS_IN_FLIGHT) -> None:
        self._publish = publish
        self._room = asyncio.Semaphore(max(1, limit))
        self._pending: set[asyncio.Task[None]] = set()
        self.failures = 0
        """Records that were not stored."""

    @property
    def in_flight(self) -> int:
        """Records published and not yet acknowledged (or failed)."""
        return len(self._pending)

    async def put(
        self, subject: str, body: bytes, wire_headers: dict[str, str], call: int | None
    ) -> asyncio.Task[None]:
        """Start storing one record (after waiting for room); the task fails with a
        ModelRecordError when it is not stored."""
        await self._room.acquire()
        try:
            task = asyncio.create_task(self._store(subject, body, wire_headers, call))
        except BaseException:
            self._room.release()
            raise
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(_retrieve)
        return task

    async def _store(
        self, subject: str, body: bytes, wire_headers: dict[str, str], call: int | None
    ) -> None:
        try:
            await self._publish(subject, body, wire_headers)
        except FuseError as error:
            self.failures += 1
            log.warning("a model record on %s was not stored: %s", subject, error)
            raise ModelRecordError(subject=subject, call=call, reason=str(error)) from error
        finally:
            self._room.release()

    @staticmethod
    async def settle(tasks: Sequence[asyncio.Task[None]]) -> None:
        """Wait until `tasks` are done; raises the first one's ModelRecordError, if any failed.

        Raises:
            ModelRecordError: a record was not stored (or its store was cancelled).
        """
        if not tasks:
            return
        await asyncio.wait(tasks)
        for task in tasks:
            if task.cancelled():
                raise ModelRecordError(
                    subject="(the message stream)", call=None, reason="its store was cancelled"
                )
            error = task.exception()
            if error is not None:
                raise error

    async def flush(self) -> None:
        """Wait until every record in flight is acknowledged or failed."""
        while self._pending:
            await asyncio.wait(set(self._pending))


class CallLog:
    """Where the records of one scope's model calls go, and what they say about the caller.

    `write` is what subclasses change; `recorded(call)` may give the stored record of call
    `call` of an earlier attempt (None: call the model).
    """

    def __init__(
        self,
        *,
        agent: str | None = None,
        correlation: str | None = None,
        context_id: str | None = None,
    ) -> None:
        self.agent = agent
        self.correlation = correlation
        self.context_id = context_id
        self.calls = 0
        self.records: list[ModelInvoked] = []

    def next_call(self) -> int:
        call = self.calls
        self.calls += 1
        return call

    async def recorded(self, call: int) -> ModelInvoked | None:
        return None

    async def write(self, invoked: ModelInvoked) -> None:
        self.records.append(invoked)


def result_of(invoked: ModelInvoked) -> ChatResult:
    """The answer a record kept, as the provider gave it."""
    return ChatResult(
        content=invoked.content,
        tool_calls=list(invoked.tool_calls),
        finish_reason=invoked.finish_reason,
        model=invoked.response_model,
        revision=invoked.revision,
        input_tokens=invoked.input_tokens,
        output_tokens=invoked.output_tokens,
    )


class RecordedModel:
    """`provider`, with each call traced and recorded to `log` (a ModelProvider itself).

    Args:
        provider: the model.
        log: where records go (a plain CallLog keeps them in `log.records`).
        tracer: the tracer of the spans (default: newfuse's, from the global provider).
        model: ask for this model whatever the caller names (a replay with another model).
    """

    def __init__(
        self,
        provider: ModelProvider,
        log: CallLog,
        *,
        tracer: trace.Tracer | None = None,
        model: str | None = None,
    ) -> None:
        self.name = provider.name
        self.provider = provider
        self.log = log
        self._tracer = tracer
        self._model = model

    def _span(self, model: str) -> Any:
        tracer = self._tracer or telemetry.tracer()
        return tracer.start_as_current_span(
            f"chat {model}",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": self.name,
                "gen_ai.request.model": model,
            },
            record_exception=False,
            set_status_on_exception=False,
        )

    def _record(
        self,
        call: int,
        messages: Sequence[ChatMessage],
        model: str,
        tools: Sequence[Tool] | None,
        params: dict[str, Any] | None,
        started: float,
        *,
        result: ChatResult | None = None,
        error: BaseException | None = None,
        streamed: bool = False,
    ) -> ModelInvoked:
        fields: dict[str, Any] = {}
        if result is not None:
            fields = {
                "response_model": result.model,
                "revision": result.revision,
                "input_tokens": result.input_tokens,
                "output_tokens": result.output_tokens,
                "content": result.content,
                "tool_calls": list(result.tool_calls),
                "finish_reason": result.finish_reason,
            }
        if error is not None:
            fields = {"error": str(error)[:2000], "error_type": type(error).__name__}
        return ModelInvoked(
            provider=self.name,
            request_model=model,
            params_hash=params_hash(model, params, tools),
            input_hash=input_hash(messages),
            params=dict(params or {}),
            outcome="ok" if error is None else "error",
            latency_ms=round((time.perf_counter() - started) * 1000.0, 3),
            agent=self.log.agent,
            correlation=self.log.correlation,
            context_id=self.log.context_id,
            call=call,
            streamed=streamed,
            **fields,
        )

    @staticmethod
    def _finish(span: Any, invoked: ModelInvoked, error: BaseException | None) -> None:
        if invoked.response_model is not None:
            span.set_attribute("gen_ai.response.model", invoked.response_model)
        if invoked.input_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", invoked.input_tokens)
        if invoked.output_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", invoked.output_tokens)
        if invoked.finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [invoked.finish_reason])
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)[:200]))

    async def _replayed(
        self, call: int, messages: Sequence[ChatMessage], model: str
    ) -> ModelInvoked | None:
        """The record of this call stored by an earlier attempt, if it asked the same."""
        stored = await self.log.recorded(call)
        if stored is None or stored.outcome != "ok" or stored.request_model != model:
            return None
        if stored.input_hash != input_hash(messages):
            return None
        return stored

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> ChatResult:
        model = self._model or model
        call = self.log.next_call()
        stored = await self._replayed(call, messages, model)
        if stored is not None:
            await self.log.write(stored)
            return result_of(stored)
        started = time.perf_counter()
        with self._span(model) as span:
            try:
                result = await self.provider.chat(messages, model=model, tools=tools, params=params)
            except Exception as error:
                invoked = self._record(call, messages, model, tools, params, started, error=error)
                self._finish(span, invoked, error)
                await self.log.write(invoked)
                raise
            invoked = self._record(call, messages, model, tools, params, started, result=result)
            self._finish(span, invoked, None)
        await self.log.write(invoked)
        return result

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> AsyncIterator[ChatChunk | ChatResult]:
        model = self._model or model
        call = self.log.next_call()
        stored = await self._replayed(call, messages, model)
        if stored is not None:
            await self.log.write(stored)
            async for item in chunked(result_of(stored)):
                yield item
            return
        started = time.perf_counter()
        result: ChatResult | None = None
        with self._span(model) as span:
            try:
                async for item in self.provider.stream(
                    messages, model=model, tools=tools, params=params
                ):
                    if isinstance(item, ChatResult):
                        result = item
                    else:
                        yield item
            except Exception as error:
                invoked = self._record(
                    call, messages, model, tools, params, started, error=error, streamed=True
                )
                self._finish(span, invoked, error)
                await self.log.write(invoked)
                raise
            result = result or ChatResult()
            invoked = self._record(
                call, messages, model, tools, params, started, result=result, streamed=True
            )
            self._finish(span, invoked, None)
        await self.log.write(invoked)
        yield result


class ModelRecorder:
    """Records model calls made outside handlers on the message stream, each stored at once
    (an async context manager).

    Example:
        async with ModelRecorder(nc, source="notebook") as recorder:
            model = recorder.model(provider)
            answer = await model.chat([ChatMessage(role="user", content="hi")], model="m")

    Args:
        nc: a connected client; the message stream of `prefix` must exist.
        source: what made the calls (an agent type, or a name of your own): records go to
            `<prefix>.a2a._model.<source>`.
        agent: the `agent` field of the records (default: `source`).
        timeout: seconds to wait for each record's PubAck.
        wait: a call returns once its record is stored (True), or at once while the record's
            PubAck is awaited in the background (False, the default: the call costs a publish,
            not a round trip; at most `in_flight` records are unacknowledged, then the next
            call's record waits for room; `flush()` and `close()` wait for what is in flight
            and raise ModelRecordError when a record was not stored, and `failed` keeps why).
        in_flight: with `wait=False`, the most records awaiting their PubAck at once.
    """

    def __init__(
        self,
        nc: Client,
        *,
        source: str,
        prefix: str = "fuse",
        agent: str | None = None,
        timeout: float = 5.0,
        wait: bool = False,
        in_flight: int = RECORDS_IN_FLIGHT,
    ) -> None:
        self.subjects = Subjects(prefix)
        self.source = check_agent_name(source, kind="model call source")
        self.subject = self.subjects.models(source)
        self.agent = agent or source
        self._inbox = PubAckInbox(nc, f"model recorder {source!r}")
        self._started = False
        self._timeout = timeout
        self._wait = wait
        self._writer = RecordWriter(self._acked, limit=in_flight)
        self._reported = 0
        self.failed: list[str] = []
        """Why records stored in the background were not stored (oldest first, at most 100)."""

    async def __aenter__(self) -> ModelRecorder:
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self._inbox.start()

    async def flush(self) -> None:
        """Wait until every record stored in the background is acknowledged (or failed).

        Raises:
            ModelRecordError: records were not stored since the last flush (says how many, and
                why the first was not).
        """
        await self._writer.flush()
        failures = self._writer.failures - self._reported
        if failures:
            self._reported = self._writer.failures
            first = self.failed[-min(failures, len(self.failed))] if self.failed else "unknown"
            raise ModelRecordError(
                subject=self.subject, call=None, reason=f"{failures} record(s) lost; {first}"
            )

    async def close(self) -> None:
        """Wait for the records in flight, then close the PubAck inbox. Idempotent.

        Raises:
            ModelRecordError: as `flush`.
        """
        try:
            await self.flush()
        finally:
            await self._inbox.close()

    def model(
        self,
        provider: ModelProvider,
        *,
        correlation: str | None = None,
        context_id: str | None = None,
    ) -> RecordedModel:
        """`provider` with each call recorded here."""
        return RecordedModel(
            provider,
            _BusLog(self, agent=self.agent, correlation=correlation, context_id=context_id),
        )

    async def store(self, invoked: ModelInvoked) -> None:
        """Store one record (its id a new UUIDv7)."""
        await self._start()
        body, wire_headers = wire.encode(
            f"model.{self.source}",
            INVOKED_TYPE,
            invoked,
            event_id=new_event_id(),
            correlation_id=invoked.context_id,
            causation_id=invoked.correlation,
        )
        if self._wait:
            await self._acked(self.subject, body, wire_headers)
            return
        task = await self._writer.put(self.subject, body, wire_headers, invoked.call)
        task.add_done_callback(self._note)

    def _note(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None and len(self.failed) < 100:
            self.failed.append(str(error))

    async def _acked(self, subject: str, body: bytes, wire_headers: dict[str, str]) -> None:
        answer = await self._inbox.request(subject, body, wire_headers, self._timeout)
        decode_pub_ack(answer, subject=subject)


class _BusLog(CallLog):
    def __init__(self, recorder: ModelRecorder, **fields: Any) -> None:
        super().__init__(**fields)
        self._recorder = recorder

    async def write(self, invoked: ModelInvoked) -> None:
        await self._recorder.store(invoked)


class StoredInvocation(msgspec.Struct, frozen=True, kw_only=True):
    """A stored `model.invoked`: its envelope, position on the message stream, and record."""

    envelope: Envelope
    position: int
    invoked: ModelInvoked


def decode_invoked(body: bytes, *, position: int, subject: str) -> StoredInvocation:
    """A stored model.invoked record, checked (depth, envelope, type, payload).

    Raises:
        InvalidEnvelopeError: it is not one (says where and why).
    """
    where = f"at position {position} on {subject}"
    envelope, invoked = wire.decode_stored(body, where, (INVOKED_TYPE,))
    return StoredInvocation(envelope=envelope, position=position, invoked=invoked)
