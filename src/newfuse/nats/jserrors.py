"""JetStream API answers in one place: PubAck decoding and error codes mapped to FuseErrors."""

from __future__ import annotations

import re
from typing import Final

import msgspec

from newfuse.errors import (
    AtomicBatchUnsupportedError,
    BatchDuplicateIdError,
    PublishRejectedError,
    WrongLastSequenceError,
)

WRONG_LAST_SEQUENCE: Final = 10071
"""`Nats-Expected-Last-Subject-Sequence` (or `Nats-Expected-Last-Sequence`) did not hold."""
ATOMIC_PUBLISH_DISABLED: Final = 10174
"""The stream does not have `allow_atomic` (ADR-50)."""
ATOMIC_BATCH_INCOMPLETE: Final = 10176
"""A batch sequence is missing (a gap, or the server abandoned the batch)."""
ATOMIC_BATCH_DUPLICATE_ID: Final = 10201
"""An atomic batch holds a `Nats-Msg-Id` seen within the duplicate window; nothing stored."""

_LAST_SEQ_RE = re.compile(r"wrong last sequence: (\d+)")


class ApiError(msgspec.Struct, frozen=True):
    """The `error` object of a JetStream API answer."""

    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct, frozen=True):
    """A publish acknowledgement (also the commit answer of an atomic batch, ADR-50)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    batch: str | None = None
    count: int = 0
    error: ApiError | None = None


_PUBACK = msgspec.json.Decoder(PubAck)


def decode_pub_ack(data: bytes, *, subject: str, server_version: str = "") -> PubAck:
    """Decode a publish answer; raise the mapped FuseError when it carries an API error.

    Args:
        data: the answer's body (JSON).
        subject: the subject published to (for messages).
        server_version: the server version, named by AtomicBatchUnsupportedError.

    Raises:
        WrongLastSequenceError, BatchDuplicateIdError, AtomicBatchUnsupportedError,
        PublishRejectedError.
    """
    try:
        ack = _PUBACK.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise PublishRejectedError(
            subject=subject, code=0, err_code=0, description=f"unreadable answer {data[:200]!r}"
        ) from None
    if ack.error is not None:
        raise error_for(ack.error, subject=subject, server_version=server_version)
    return ack


def error_for(error: ApiError, *, subject: str, server_version: str = "") -> Exception:
    """The FuseError for a JetStream API error answered to a publish on `subject`."""
    code, err_code, text = error.code, error.err_code, error.description
    if err_code == WRONG_LAST_SEQUENCE:
        match = _LAST_SEQ_RE.search(text)
        return WrongLastSequenceError(
            subject=subject,
            code=code,
            err_code=err_code,
            description=text,
            last_sequence=int(match.group(1)) if match else None,
        )
    if err_code == ATOMIC_BATCH_DUPLICATE_ID:
        return BatchDuplicateIdError(
            subject=subject, code=code, err_code=err_code, description=text
        )
    if err_code == ATOMIC_PUBLISH_DISABLED:
        stream = subject
        return AtomicBatchUnsupportedError(
            stream=stream,
            server_version=f"{server_version or 'unknown'}, and its stream has allow_atomic off",
        )
    return PublishRejectedError(subject=subject, code=code, err_code=err_code, description=text)
