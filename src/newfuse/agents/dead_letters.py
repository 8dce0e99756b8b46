"""Dead letters: list the messages agents gave up on, show one, and send its message again.

A dead letter (`agent.dead_letter` on `<prefix>.a2a._dead.<consumer>`) names the message's
position on the message stream; a replay reads the message there and stores it again as a new
message, with an id derived from the dead letter's id, so replaying one letter twice sends
once: the duplicate window catches a retry, and outside it the replay first looks for that id
on the target subject after the letter. It goes to the subject the message was delivered on,
except a topic's: the letter belongs to one consumer (one agent type), so it goes to that
type's inbox and not to every type subscribing to the topic again. `replyTo` is dropped: the
requester was answered with the error when the letter was written.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError

from newfuse.agents import wire
from newfuse.agents.address import check_agent_name
from newfuse.errors import (
    DeadLetterNotFoundError,
    DeadLetterReplayError,
    FuseError,
)
from newfuse.nats import headers
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.nats.jserrors import client_error, decode_pub_ack
from newfuse.nats.subjects import Subjects
from newfuse.schemas import (
    A2AMessage,
    DeadLetter,
    Envelope,
    default_registry,
)

log = logging.getLogger("newfuse.agents")

DEAD_LETTER_TYPE: Final = "agent.dead_letter"
_REGISTRY: Final = default_registry()


class StoredDeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter as stored: its event id, position and time, and the letter."""

    id: str
    position: int
    timestamp: datetime
    letter: DeadLetter

    @property
    def agent_type(self) -> str:
        """The agent type whose consumer gave up (`<type>` or `<type>__<key>`)."""
        return self.letter.consumer.split("__", 1)[0]


class Replayed(msgspec.Struct, frozen=True, kw_only=True):
    """What a replay stored: the new message's id, subject and position; `already` when an
    earlier replay of the same letter had stored it (nothing was sent this time)."""

    letter_id: str
    message_id: str
    subject: str
    position: int
    already: bool = False


def decode_dead_letter(body: bytes, *, position: int, subject: str) -> StoredDeadLetter:
    """A stored dead letter, checked.

    Raises:
        InvalidEnvelopeError: it is not one (says where and why).
    """
    where = f"at position {position} on {subject}"
    envelope, letter = wire.decode_stored(body, where, (DEAD_LETTER_TYPE,), _REGISTRY)
    return StoredDeadLetter(
        id=envelope.id, position=position, timestamp=envelope.timestamp, letter=letter
    )


class DeadLetters:
    """The dead letters of the message stream of `prefix`.

    `skipped` lists what the last listing read on a dead-letter subject that is not one.
    """

    def __init__(self, nc: Client, *, prefix: str = "fuse", timeout: float = 5.0) -> None:
        self.subjects = Subjects(prefix)
        self._nc = nc
        self._timeout = timeout
        self._direct = DirectGet(nc, self.subjects.message_stream_name, timeout=timeout)
        self.skipped: list[str] = []

    async def all(self, *, agent_type: str | None = None) -> list[StoredDeadLetter]:
        """Every dead letter (of `agent_type`'s consumers only, if given), oldest first."""
        found: list[StoredDeadLetter] = []
        self.skipped = []
        async for msg in self._direct.messages(
            self.subjects.all_dead_letters, "list the dead letters"
        ):
            subject = (msg.headers or {}).get(headers.SUBJECT, "")
            try:
                stored = decode_dead_letter(msg.data, position=sequence_of(msg), subject=subject)
            except FuseError as error:
                log.warning("dead letters: skipped %s", error)
                self.skipped.append(str(error))
                continue
            if agent_type is None or stored.agent_type == agent_type:
                found.append(stored)
        return found

    async def get(self, letter_id: str) -> StoredDeadLetter:
        """The dead letter with id `letter_id`, or the one whose id starts with it.

        Raises:
            DeadLetterNotFoundError: none has it, or several start with it.
        """
        letters = await self.all()
        exact = [s for s in letters if s.id == letter_id]
        if exact:
            return exact[0]
        matches = [s for s in letters if letter_id and s.id.startswith(letter_id)]
        if len(matches) == 1:
            return matches[0]
        reason = (
            f"{len(matches)} dead letters start with it; give more of the id"
            if matches
            else f"none of the {len(letters)} dead letters has that id"
        )
        raise DeadLetterNotFoundError(letter_id=letter_id, reason=reason)

    async def original(self, stored: StoredDeadLetter) -> tuple[Envelope, A2AMessage]:
        """The message the letter gave up on, read at its position and checked.

        Raises:
            DeadLetterReplayError: it is gone (the stream's limits removed it), it is not the
                message the letter names, or it never was an A2A message.
        """
        letter = stored.letter

        def refuse(reason: str) -> DeadLetterReplayError:
            return DeadLetterReplayError(
                letter_id=stored.id, position=letter.position, reason=reason
            )

        msg = await self._direct.get("read a dead letter's message", seq=letter.position)
        if msg is None:
            raise refuse("it is no longer in the stream (removed by its age or size limits)")
        subject = (msg.headers or {}).get(headers.SUBJECT, "")
        if subject != letter.subject:
            raise refuse(f"the message there is on {subject!r}, not on {letter.subject!r}")
        try:
            envelope, message = wire.decode(msg.data, f"at position {letter.position}")
        except FuseError as error:
            raise refuse(
                f"it is not an A2A message, so there is nothing to send ({error})"
            ) from None
        if letter.message_id is not None and envelope.id != letter.message_id:
            raise refuse(f"the message there is {envelope.id!r}, not {letter.message_id!r}")
        return envelope, message

    def target(self, stored: StoredDeadLetter) -> tuple[str, str]:
        """The subject and envelope stream a replay of `stored` goes to.

        Raises:
            InvalidNameError: a topic's letter names a consumer that is no agent type.
        """
        subject = stored.letter.subject
        if subject.startswith(self.subjects.topic("")):
            agent_type = check_agent_name(stored.agent_type, kind="agent type")
            return self.subjects.agent_type(agent_type), f"a2a.{agent_type}"
        return subject, ""

    async def replay(self, letter_id: str) -> Replayed:
        """Store the letter's message again as a new message (see the module's docstring).

        Raises:
            DeadLetterNotFoundError: no such letter.
            DeadLetterReplayError: its message cannot be read back (see `original`).
        """
        stored = await self.get(letter_id)
        envelope, message = await self.original(stored)
        subject, stream = self.target(stored)
        new_id = wire.derived_id(stored.id, "replay", "1")
        async for msg in self._direct.messages(
            subject, "look for an earlier replay", stored.position + 1
        ):
            if (msg.headers or {}).get(headers.MSG_ID) == new_id:
                return Replayed(
                    letter_id=stored.id,
                    message_id=new_id,
                    subject=subject,
                    position=sequence_of(msg),
                    already=True,
                )
        again = msgspec.structs.replace(message, message_id=new_id, reply_to=None)
        body, wire_headers = wire.encode(
            stream or envelope.stream,
            wire.MESSAGE_TYPE,
            again,
            event_id=new_id,
            correlation_id=envelope.correlation_id,
            causation_id=stored.id,
        )
        try:
            answer = await self._nc.request(
                subject, body, timeout=self._timeout, headers=wire_headers
            )
        except NatsError as error:
            raise client_error(f"replay to {subject!r}", error) from None
        ack = decode_pub_ack(answer.data, subject=subject)
        return Replayed(
            letter_id=stored.id,
            message_id=new_id,
            subject=subject,
            position=ack.seq,
            already=ack.duplicate,
        )
