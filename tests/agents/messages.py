"""Reading back what is stored on the message stream, by subject (the tests' ground truth)."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError

from newfuse.nats import DirectGet, Subjects
from newfuse.schemas import ENVELOPE_DECODER, Envelope, default_registry
from support import wait_for

REGISTRY = default_registry()


async def stored(nc: Client, prefix: str, subject: str) -> list[Envelope]:
    """Every message stored on `subject` (wildcards allowed), in stream order."""
    direct = DirectGet(nc, Subjects(prefix).message_stream_name, timeout=5.0)
    return [
        ENVELOPE_DECODER.decode(msg.data) async for msg in direct.messages(subject, "test read")
    ]


def payload(envelope: Envelope) -> Any:
    """The decoded payload of a stored envelope (an A2AMessage, a DeadLetter, ...)."""
    return REGISTRY.decode(envelope.type, envelope.schema_version, envelope.data)


async def settled(nc: Client, prefix: str, consumer: str) -> None:
    """Wait until `consumer` has acked everything: every handled message's effects are stored
    (a reply is seen by core subscribers when published, before its batch commits)."""
    name = Subjects(prefix).message_stream_name

    async def acked() -> bool:
        try:
            info = await nc.jetstream().consumer_info(name, consumer)
        except NatsError:  # a cluster electing a leader does not answer yet: ask again
            return False
        return info.num_pending == 0 and info.num_ack_pending == 0

    await wait_for(acked, timeout=60)
