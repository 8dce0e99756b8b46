"""Replay an agent's handling of a past conversation, its model calls answered from the log.

`replay(nc, agent, context_id=...)` reads the message stream once: the messages of the
conversation that reached the agent's type (its inbox, its instances' inboxes, its topics),
what its handlers stored for each (replies, sends, task changes, dead letters: the envelopes
caused by that message) and its `model.invoked` records. Then, in this process, it runs the
handler of each message again on a dry-run Context whose effects are compared, never
published: nothing is written to the bus.

Each model call is answered from the record of the same call (by order: call 0, 1, ... of
that message) at no cost, so a replay of unchanged code reproduces what was stored; the input
hash tells whether the handler asked the same. With `provider` (and/or `model`) the calls go
to that model instead, and the replay shows where its answers, and what the handler made of
them, diverge from what was recorded. Effect ids are derived from the message and the
consumer as the runtime derives them, so a replayed effect is compared with the stored one of
the same id; envelope timestamps and latencies are left out of the comparison.

A queue's Worker replays too: its tasks are the messages on `<prefix>.task.<queue>.*` (found by
`--context` or by task id), each handled as the worker does (a TaskContext with the task's
terms; the handler's return value becomes the `completed` status with its `result` artifact),
and compared with what its worker stored for it. The `working` statuses are the worker's
bookkeeping of each attempt, not the handler's doing: they are left out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Final, Literal

import msgspec
from nats.aio.client import Client

from newfuse.agents import sealing, wire
from newfuse.agents.address import AgentId
from newfuse.agents.models.base import ChatChunk, ChatResult, ModelProvider, chunked
from newfuse.agents.models.recording import INVOKED_TYPE, decode_invoked, result_of
from newfuse.agents.queues import (
    SUBMITTER_KEY,
    TASK_MESSAGE_TYPE,
    TaskContext,
    Worker,
    result_artifacts,
    terms_of,
)
from newfuse.agents.runtime import Agent, Context, _HandlerLog, _Route, run_handler
from newfuse.agents.tasks import SENDER, STATUS_TYPE
from newfuse.errors import (
    FuseError,
    InvalidNameError,
    ModelReplayError,
    ModelUnavailableError,
    SealedValueError,
)
from newfuse.nats import headers
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.subjects import Subjects
from newfuse.schemas import (
    ENVELOPE_DECODER,
    ChatMessage,
    Envelope,
    FieldCipher,
    ModelInvoked,
    Tool,
    check_depth,
)

_VOLATILE: Final = frozenset({"timestamp", "latencyMs"})

EffectChange = Literal["same", "changed", "missing", "extra"]


class CallComparison(msgspec.Struct, frozen=True, kw_only=True):
    """One model call of a replayed message: what was recorded, what the replay got.

    `diverged` when one of them is missing, the input differs (another prompt), or the answer
    differs (content, tool calls or outcome); `reason` says which.
    """

    call: int
    recorded: ModelInvoked | None
    replayed: ModelInvoked | None
    diverged: bool
    reason: str = ""


class EffectComparison(msgspec.Struct, frozen=True, kw_only=True):
    """One effect of a replayed message (a reply, a send, a task change, a dead letter), by
    id: `same`, `changed`, `missing` (stored, not made again) or `extra` (made, not stored).
    `recorded` and `replayed` are its payloads without timestamps."""

    id: str
    subject: str
    type: str
    change: EffectChange
    recorded: Any = None
    replayed: Any = None


class ReplayedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """The replay of one message of the conversation.

    Attributes:
        position: the message's position on the message stream.
        message_id: its envelope id.
        type: its message type.
        consumer: the consumer that handled it (whose ids the effects derive from).
        calls: each model call, recorded against replayed.
        effects: each effect, recorded against replayed (model records are in `calls`).
        error: what the handler raised in the replay, if it did.
        diverged: any call or effect differs, or the handler raised.
    """

    position: int
    message_id: str
    type: str
    consumer: str
    calls: list[CallComparison]
    effects: list[EffectComparison]
    error: str | None = None
    diverged: bool = False


class _Input(msgspec.Struct, kw_only=True):
    position: int
    subject: str
    consumer: str
    envelope: Envelope
    message: Any  # A2AMessage
    records: list[ModelInvoked] = []
    effects: list[tuple[str, Envelope]] = []


class _Recorded:
    """Answers a message's model calls from its records, in order."""

    def __init__(self, name: str, records: Sequence[ModelInvoked], message_id: str) -> None:
        self.name = name
        self._records = records
        self._message_id = message_id
        self._next = 0

    def _take(self) -> ModelInvoked:
        call = self._next
        self._next += 1
        if call >= len(self._records):
            raise ModelReplayError(
                message_id=self._message_id, call=call, recorded=len(self._records)
            )
        return self._records[call]

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> ChatResult:
        record = self._take()
        if record.outcome != "ok":
            raise ModelUnavailableError(
                provider=record.provider,
                url="(recorded)",
                reason=record.error or "the recorded call failed",
            )
        return result_of(record)

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> AsyncIterator[ChatChunk | ChatResult]:
        result = await self.chat(messages, model=model, tools=tools, params=params)
        async for item in chunked(result):
            yield item


class _DryRun:
    """The runtime a replayed handler sees: reads work, effects stay in its Context."""

    def __init__(
        self,
        agent_id: AgentId,
        subjects: Subjects,
        direct: DirectGet,
        answers: ModelProvider | None,
        provider: ModelProvider | None,
        model: str | None,
    ) -> None:
        self.agent_id = agent_id
        self.subjects = subjects
        self._direct = direct
        self._answers = answers
        self._provider = provider
        self._model = model

    def _provider_for(self, provider: ModelProvider) -> tuple[ModelProvider, str | None]:
        if self._answers is not None:
            return self._answers, None
        return self._provider or provider, self._model

    async def _store_record(self, ctx: Context, effect: Any, call: int) -> bool:
        return False  # a dry run: the record stays in the Context, compared, never published


def _stripped(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stripped(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stripped(item) for item in value]
    return value


def _payload_of(envelope: Envelope) -> Any:
    return _stripped(msgspec.json.decode(envelope.data))


def _compare_calls(
    recorded: Sequence[ModelInvoked], replayed: Sequence[ModelInvoked]
) -> list[CallComparison]:
    compared = []
    for call in range(max(len(recorded), len(replayed))):
        old = recorded[call] if call < len(recorded) else None
        new = replayed[call] if call < len(replayed) else None
        reason = ""
        if old is None:
            reason = "not recorded: the replay made an extra call"
        elif new is None:
            reason = "not made by the replay"
        else:
            differs = []
            if old.input_hash != new.input_hash:
                differs.append("input")
            if old.request_model != new.request_model:
                differs.append(f"model {old.request_model} -> {new.request_model}")
            if (old.outcome, old.content, old.tool_calls) != (
                new.outcome,
                new.content,
                new.tool_calls,
            ):
                differs.append("output")
            if differs:
                reason = " and ".join(differs) + " differ"
        compared.append(
            CallComparison(
                call=call, recorded=old, replayed=new, diverged=bool(reason), reason=reason
            )
        )
    return compared


def _status_subject(subjects: Subjects, queue: str, ctx: TaskContext) -> str | None:
    """Where the worker stored the task's statuses: under its submitter term (a secured
    worker used the signer, which is the term for a submitter that did not lie)."""
    submitter = ctx.envelope.metadata.get(SUBMITTER_KEY)
    if submitter is None:
        return None  # an older client's task: its own subject
    try:
        return subjects.queued_task_events(queue, submitter, ctx.task_id)
    except InvalidNameError:
        return None


def _compare_effects(
    recorded: Sequence[tuple[str, Envelope]], ctx: Context
) -> list[EffectComparison]:
    stored = {envelope.id: (subject, envelope) for subject, envelope in recorded}
    made: dict[str, tuple[str, Envelope]] = {}
    for subject, body, wire_headers in ctx._effects:
        if wire_headers.get(headers.TYPE) == INVOKED_TYPE:
            continue
        made[wire_headers[headers.MSG_ID]] = (subject, ENVELOPE_DECODER.decode(body))
    compared = []
    for effect_id in [*stored, *(i for i in made if i not in stored)]:
        old, new = stored.get(effect_id), made.get(effect_id)
        either = old if old is not None else new
        assert either is not None
        subject, envelope = either
        before = _payload_of(old[1]) if old else None
        after = _payload_of(new[1]) if new else None
        change: EffectChange = (
            "missing"
            if new is None
            else "extra"
            if old is None
            else "same"
            if before == after
            else "changed"
        )
        compared.append(
            EffectComparison(
                id=effect_id,
                subject=subject,
                type=envelope.type,
                change=change,
                recorded=before,
                replayed=after,
            )
        )
    return compared


class _DryLog(_HandlerLog):
    """A replayed handler's model log: calls are answered by the replay's provider (the
    records, or another model), never by what an earlier attempt stored."""

    async def recorded(self, call: int) -> ModelInvoked | None:
        return None


def _working(envelope: Envelope) -> bool:
    if envelope.type != STATUS_TYPE:
        return False
    try:
        state = msgspec.json.decode(envelope.data).get("state")
    except (msgspec.DecodeError, AttributeError):
        return False
    return bool(state == "working")


class Replay:
    """Replays one agent type's handling of conversations stored under `prefix`.

    `skipped` lists what the last run could not read (position and why).

    Args:
        nc: a connected client (only reads are sent).
        agent: the agent's definition (its handlers as they are now), or a queue's Worker
            (its tasks are replayed as its workers handled them).
        provider: answer model calls with this provider instead of the records.
        model: ask for this model instead of the one the handler names (with the handler's
            own provider unless `provider` is given).
        cipher: the deployment's keys (an admin's): a message's sealed values reach the
            handler opened, as the runtime gave them; without keys, or once forgotten, as the
            replacement its struct declares (and `Context.redacted` lists them).
    """

    def __init__(
        self,
        nc: Client,
        agent: Agent | Worker,
        *,
        prefix: str = "fuse",
        provider: ModelProvider | None = None,
        model: str | None = None,
        timeout: float = 5.0,
        cipher: FieldCipher | None = None,
    ) -> None:
        self.cipher = cipher
        self.worker = agent if isinstance(agent, Worker) else None
        self.agent = agent.agent if isinstance(agent, Worker) else agent
        self.subjects = Subjects(prefix)
        self._direct = DirectGet(nc, self.subjects.message_stream_name, timeout=timeout)
        self._provider = provider
        self._model = model
        self.skipped: list[str] = []

    def _consumer_of(self, subject: str) -> str | None:
        """The consumer of the agent's type that takes messages on `subject` (None: not one)."""
        if self.worker is not None:
            lanes = f"{self.subjects.prefix}.task.{self.worker.queue}."
            priority = subject[len(lanes) :]
            if subject.startswith(lanes) and priority.isdigit() and len(priority) == 1:
                return f"task-{self.worker.queue}-p{priority}"
            return None
        agent_type = self.agent.type
        own = self.subjects.agent_type(agent_type)
        if subject == own:
            return agent_type
        if subject.startswith(own + ".") and "." not in subject[len(own) + 1 :]:
            return f"{agent_type}__{subject[len(own) + 1 :]}"
        if subject in {self.subjects.topic(topic) for topic in self.agent.topics}:
            return agent_type
        return None

    async def _read(self, context_id: str | None, task_id: str | None) -> list[_Input]:
        inputs: dict[str, _Input] = {}
        models = self.subjects.models(self.agent.type)
        # a queue's tasks wait on `<prefix>.task.*`, their effects on `<prefix>.a2a.*`
        everything = f"{self.subjects.prefix}.{'>' if self.worker is not None else 'a2a.>'}"
        async for msg in self._direct.messages(everything, "read the conversation to replay"):
            subject = (msg.headers or {}).get(headers.SUBJECT, "")
            position = sequence_of(msg)
            if "._handled." in subject:
                continue
            where = f"at position {position} on {subject}"
            try:
                check_depth(msg.data, where)
                envelope = ENVELOPE_DECODER.decode(msg.data)
            except (FuseError, msgspec.DecodeError, msgspec.ValidationError) as error:
                self.skipped.append(f"{where}: {error}")
                continue
            if subject == models:
                try:
                    invoked = decode_invoked(msg.data, position=position, subject=subject).invoked
                except FuseError as error:
                    self.skipped.append(str(error))
                    continue
                handled = inputs.get(invoked.correlation or "")
                if handled is not None:
                    handled.records.append(invoked)
                continue
            cause = inputs.get(envelope.causation_id or "")
            if cause is not None:
                cause.effects.append((subject, envelope))
                continue
            consumer = self._consumer_of(subject)
            if consumer is None or envelope.type != wire.MESSAGE_TYPE:
                continue
            try:
                _, message = wire.decode(msg.data, where)
            except FuseError as error:
                self.skipped.append(str(error))
                continue
            if context_id is not None and (
                (message.context_id or envelope.correlation_id) != context_id
            ):
                continue
            if task_id is not None and message.task_id != task_id:
                continue
            inputs[envelope.id] = _Input(
                position=position,
                subject=subject,
                consumer=consumer,
                envelope=envelope,
                message=message,
                records=[],
                effects=[],
            )
        return list(inputs.values())

    def _agent_id(self, handled: _Input) -> AgentId:
        """The instance that handled it: from its records or its effects' sender."""
        names = [r.agent for r in handled.records if r.agent]
        for _, envelope in handled.effects:
            if envelope.metadata.get(SENDER):
                names.append(envelope.metadata[SENDER])
            elif envelope.type == wire.MESSAGE_TYPE:
                sender = msgspec.json.decode(envelope.data).get("metadata", {}).get("sender")
                if isinstance(sender, str):
                    names.append(sender)
        for name in names:
            agent_type, slash, key = name.partition("/")
            if slash and agent_type == self.agent.type and key:
                return AgentId.of(agent_type, key)
        return AgentId.of(self.agent.type, "replay")

    async def _run_task(self, route: _Route, ctx: TaskContext, handled: _Input) -> None:
        """As a worker runs a task: its terms, the handler, its result as `completed`."""
        ctx.terms = terms_of(
            ctx.envelope.metadata, f"at position {handled.position} on {handled.subject}"
        )
        ctx._task_recorded = True  # the submitter stored the task's message
        kept: list[Any] = []

        async def keep_result(inner: Context, payload: Any) -> None:
            kept.append(await route.handler(inner, payload))

        await run_handler(_Route(keep_result, route.payload), ctx)
        ctx.task_status("completed", artifacts=result_artifacts(kept[0] if kept else None))

    async def messages(
        self, context_id: str | None = None, *, task_id: str | None = None
    ) -> AsyncIterator[ReplayedMessage]:
        """The replay of each message of conversation `context_id` (or of task `task_id`, or
        both) the agent has a handler for, oldest first.

        Raises:
            ValueError: neither `context_id` nor `task_id` is given.
            StoreUnavailableError, ElectionTimeoutError: the stream did not answer.
        """
        if context_id is None and task_id is None:
            raise ValueError("replay a conversation (context_id) or a task (task_id)")
        self.skipped = []
        for handled in await self._read(context_id, task_id):
            route = self.agent.routes.get(handled.message.type)
            if route is None:
                continue
            latest = {record.call: record for record in handled.records}  # a retry's last
            handled.records = [latest[call] for call in sorted(latest)]
            answers = None
            if self._provider is None and self._model is None:
                name = handled.records[0].provider if handled.records else "recorded"
                answers = _Recorded(name, handled.records, handled.envelope.id)
            runtime = _DryRun(
                self._agent_id(handled),
                self.subjects,
                self._direct,
                answers,
                self._provider,
                self._model,
            )
            task = self.worker is not None and handled.message.type == TASK_MESSAGE_TYPE
            # A task replays the attempt that stored its outcome (one `working` per attempt).
            attempts = sum(1 for _, e in handled.effects if _working(e)) if task else 1
            ctx = (TaskContext if task else Context)(
                runtime,
                handled.envelope,
                handled.message,
                consumer=handled.consumer,
                attempt=max(1, attempts),
                position=handled.position,
            )
            if isinstance(ctx, TaskContext) and self.worker is not None:
                ctx.status_subject = _status_subject(self.subjects, self.worker.queue, ctx)
            ctx._model_log = _DryLog(ctx)
            if sealing.holds_sealed(handled.message):  # a form check for every other message
                try:
                    opened, ctx.redacted = await sealing.open_held(
                        self.cipher,
                        handled.message,
                        handled.envelope.id,
                        replacement=None,
                        payload_type=route.payload,
                    )
                except SealedValueError as failure:
                    self.skipped.append(f"at position {handled.position}: {failure}")
                    continue
                ctx._opened = opened.payload
            error = None
            try:
                if isinstance(ctx, TaskContext):
                    await self._run_task(route, ctx, handled)
                else:
                    await run_handler(route, ctx)
            except Exception as failure:
                error = f"{type(failure).__name__}: {failure}"
                ctx._effects.clear()  # a handler that raises emits nothing
            replayed = ctx._model_log.records if ctx._model_log is not None else []
            calls = _compare_calls(handled.records, replayed)
            stored = handled.effects
            if task:  # each attempt's `working` is the worker's bookkeeping
                stored = [(s, e) for s, e in stored if not _working(e)]
            effects = _compare_effects(stored, ctx)
            if error is not None:  # the runtime stored its dead letter: not an effect of ours
                effects = [e for e in effects if e.type != "agent.dead_letter"]
            yield ReplayedMessage(
                position=handled.position,
                message_id=handled.envelope.id,
                type=handled.message.type,
                consumer=handled.consumer,
                calls=calls,
                effects=effects,
                error=error,
                diverged=error is not None
                or any(c.diverged for c in calls)
                or any(e.change != "same" for e in effects),
            )
