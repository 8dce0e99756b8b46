"""What agents said to each other, read back from the message stream: a conversation's replay.

Every A2A message is stored on the message stream before anyone handles it, so the log is the
conversation: requests, replies, topic messages, task status changes and dead letters, in the
order the stream stored them. `History` reads them by direct get (nothing is consumed, nothing
written), decodes each body as the runtime would (hostile or broken bodies are listed in
`skipped` with their position, never raised) and filters by conversation, agent or task.
Handled markers (`_handled`), model call records (`_model`) and the copies of messages a task
keeps are bookkeeping, not turns of the conversation: they are passed over.

Sealed values (`$.payload.<field>`, agents/sealing.py) are opened with the reader's own keys
(`cipher`: an admin's, who may read the keys' bucket); without keys, or once their subject is
forgotten, they read as "[redacted]" and `Turn.redacted` lists them. A value that does not
open (moved from another message or field, altered) makes its turn skipped and reported, as
the event store skips such an event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Literal

import msgspec
from nats.aio.client import Client

from newfuse.agents import sealing, wire
from newfuse.agents.aggregate import SENDER as AGGREGATE_SENDER
from newfuse.agents.aggregate import decode_aggregate_event
from newfuse.agents.dead_letters import StoredDeadLetter, decode_dead_letter
from newfuse.agents.tasks import SENDER, STATUS_TYPE, decode_task_event
from newfuse.errors import FuseError, KeyStoreError
from newfuse.nats import headers
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.subjects import Subjects
from newfuse.schemas import A2AMessage, AggregateClosed, FieldCipher, TaskStatusUpdate

Kind = Literal["message", "reply", "topic", "status", "dead-letter", "aggregate"]


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """One stored turn of a conversation.

    Attributes:
        position: the JetStream sequence on the message stream.
        time: when the writer stamped it (the envelope's timestamp).
        kind: a message to an agent, a reply, a topic message, a task's status change, a
            dead letter, or an aggregate's event (closed, a late reply).
        sender: who wrote it (`metadata.sender`; for a status, the agent that moved the task).
        to: whom it was for: an agent type, `type/key`, `#topic`, the requester of a reply,
            `task <id>` or `aggregate <id>`; a dead letter goes from the consumer that gave up
            to the subject of the message it gave up on.
        type: the message type, the task's new state, or the dead message's type.
        id: the event id.
        context_id: the conversation it belongs to.
        task_id: the task it belongs to, if any.
        text: its text parts, or a short form of its payload (sealed values opened).
        redacted: the payload paths that read as "[redacted]": their subject is forgotten,
            or the reader holds no keys.
    """

    position: int
    time: datetime
    kind: Kind
    sender: str
    to: str
    type: str
    id: str
    context_id: str | None = None
    task_id: str | None = None
    text: str = ""
    redacted: tuple[str, ...] = ()


def _text_of(message: A2AMessage) -> str:
    texts = [part.text for part in message.parts if getattr(part, "text", None)]
    if texts:
        return " ".join(str(text) for text in texts)
    if message.payload:
        return msgspec.json.encode(message.payload).decode()
    return ""


class History:
    """Reads the conversation stored on the message stream of `prefix` (never writes).

    `skipped` lists what the last `turns` could not read (position and why). With `cipher`
    (a SubjectCipher over the deployment's key store) sealed values show opened.
    """

    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = "fuse",
        timeout: float = 5.0,
        cipher: FieldCipher | None = None,
    ) -> None:
        self.subjects = Subjects(prefix)
        self.cipher = cipher
        self._direct = DirectGet(nc, self.subjects.message_stream_name, timeout=timeout)
        self._cut = len(self.subjects.prefix) + len(".a2a.")
        self.skipped: list[str] = []

    async def turns(
        self,
        *,
        context_id: str | None = None,
        agent: str | None = None,
        task_id: str | None = None,
        start: int = 1,
    ) -> AsyncIterator[Turn]:
        """Every turn from position `start` on, oldest first; only those of conversation
        `context_id`, of agent type `agent` (as sender or addressee) or of task `task_id` when
        given.

        Raises:
            StoreUnavailableError, ElectionTimeoutError: the stream did not answer.
        """
        self.skipped = []
        everything = f"{self.subjects.prefix}.a2a.>"
        async for msg in self._direct.messages(everything, "read the conversation", start):
            subject = (msg.headers or {}).get(headers.SUBJECT, "")
            turn = await self._turn(msg.data, sequence_of(msg), subject)
            if turn is None:
                continue
            if context_id is not None and turn.context_id != context_id:
                continue
            if task_id is not None and turn.task_id != task_id:
                continue
            if agent is not None and agent not in (_type_of(turn.sender), _type_of(turn.to)):
                continue
            yield turn

    async def _turn(self, body: bytes, position: int, subject: str) -> Turn | None:
        where = subject[self._cut :]
        head, _, rest = where.partition(".")
        if head in ("_handled", "_model") or not where:
            return None
        try:
            if head == "_task":
                return await self._status(body, position, subject, rest)
            if head == "_aggregate":
                return self._aggregate(body, position, subject, rest)
            if head == "_dead":
                return self._dead_letter(
                    decode_dead_letter(body, position=position, subject=subject)
                )
            envelope, message = wire.decode(body, f"at position {position} on {subject}")
            redacted: tuple[str, ...] = ()
            if sealing.SEALED_MARK in body:  # one substring search for every other message
                message, redacted = await sealing.open_held(self.cipher, message, envelope.id)
        except KeyStoreError:
            raise  # the keys did not answer: an error, never a turn silently left out
        except FuseError as error:
            self.skipped.append(f"position {position} on {subject}: {error}")
            return None
        kind: Kind = "message"
        to = where.replace(".", "/", 1)
        if head == "_reply":
            kind, to = "reply", f"reply {rest}"
        elif head == "_topic":
            kind, to = "topic", f"#{rest}"
        return Turn(
            position=position,
            time=envelope.timestamp,
            kind=kind,
            sender=message.metadata.sender,
            to=to,
            type=message.type,
            id=envelope.id,
            context_id=message.context_id or envelope.correlation_id,
            task_id=message.task_id,
            text=_text_of(message),
            redacted=redacted,
        )

    async def _status(self, body: bytes, position: int, subject: str, task: str) -> Turn | None:
        event = decode_task_event(body, position=position, subject=subject)
        status = event.payload
        if event.envelope.type != STATUS_TYPE or not isinstance(status, TaskStatusUpdate):
            return None  # the copy of a message the task received: shown where it was sent
        said = ""
        redacted: tuple[str, ...] = ()
        if status.message is not None:
            said_in = status.message
            if sealing.SEALED_MARK in body:  # a copy keeps the values its message was sent with
                said_in, redacted = await sealing.open_held(
                    self.cipher, said_in, said_in.message_id or event.envelope.id
                )
            said = _text_of(said_in)
        sender = event.envelope.metadata.get(SENDER) or (
            status.message.metadata.sender if status.message is not None else ""
        )
        return Turn(
            position=position,
            time=event.envelope.timestamp,
            kind="status",
            sender=sender,
            to=f"task {task.rpartition('.')[2]}",  # a queued task's: <queue>.<submitter>.<id>
            type=status.state,
            id=event.envelope.id,
            context_id=status.context_id,
            task_id=status.task_id,
            text=said,
            redacted=redacted,
        )

    def _aggregate(self, body: bytes, position: int, subject: str, aggregate_id: str) -> Turn:
        envelope, event = decode_aggregate_event(body, position=position, subject=subject)
        if isinstance(event, AggregateClosed):
            rule = f"quorum({event.quorum})" if event.strategy == "quorum" else event.strategy
            said = [f"{rule}: {event.outcome}", f"answered {', '.join(event.answered) or '-'}"]
            if event.failed:
                said.append(f"failed {', '.join(event.failed)}")
            if event.missing:
                said.append(f"missing {', '.join(event.missing)}")
            text = "; ".join(said)
            context_id: str | None = event.context_id
        else:
            text = f"late reply from {event.agent} ({event.reply})"
            context_id = envelope.correlation_id
        return Turn(
            position=position,
            time=envelope.timestamp,
            kind="aggregate",
            sender=envelope.metadata.get(AGGREGATE_SENDER, ""),
            to=f"aggregate {aggregate_id}",
            type=envelope.type,
            id=envelope.id,
            context_id=context_id,
            text=text,
        )

    def _dead_letter(self, stored: StoredDeadLetter) -> Turn:
        letter = stored.letter
        return Turn(
            position=stored.position,
            time=stored.timestamp,
            kind="dead-letter",
            sender=letter.consumer,
            to=letter.subject,
            type=letter.message_type or "?",
            id=stored.id,
            text=f"after {letter.attempts} attempt(s): {letter.error}",
        )


def _type_of(address: str) -> str:
    return address.partition("/")[0]
