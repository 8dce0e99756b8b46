"""Reading back what is stored on the message stream, by subject (the tests' ground truth)."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client

from newfuse.nats import DirectGet, Subjects
from newfuse.schemas import ENVELOPE_DECODER, Envelope, default_registry

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
