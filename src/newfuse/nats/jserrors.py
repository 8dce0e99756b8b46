"""JetStream API answers and nats-py client errors in one place, mapped to FuseErrors.

The rule for `retryable`: only where waiting can help (the server is away, restarting, electing
a leader, busy). A refusal the same call would meet again (too large, badly formed, a closed
connection, a stream at its limits) is permanent and says what to change.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec
from nats import errors as nats_errors

from newfuse.errors import (
    AtomicBatchUnsupportedError,
    ClientRefusedError,
    FuseError,
    JetStreamRefusedError,
    PublishRejectedError,
    PublishUnavailableError,
    StoreConnectionClosedError,
    StoreUnavailableError,
    StreamCreateError,
    StreamCreateUnavailableError,
)

WRONG_LAST_SEQUENCE: Final = 10071
WRONG_LAST_SEQUENCE_CONSTANT: Final = 10164
"""The same refusal with no sequence in its text: seen from nats-server 2.15 on a new stream
leader right after an election, while an earlier attempt of the same append may be in flight."""
"""`Nats-Expected-Last-Subject-Sequence` (or `Nats-Expected-Last-Sequence`) did not hold."""
ATOMIC_PUBLISH_DISABLED: Final = 10174
"""The stream does not have `allow_atomic` (ADR-50)."""
ATOMIC_BATCH_INCOMPLETE: Final = 10176
"""A batch sequence is missing (a gap, or the server abandoned the batch): nothing of it was
stored; retryable (seen after a SIGSTOP/SIGCONT of the stream leader under load)."""
DUPLICATE_IN_PROCESS: Final = 10158
"""A message with this `Nats-Msg-Id` is being stored right now (a retry met its first attempt,
still in the stream's Raft proposal): the first attempt's outcome decides, ask again shortly."""
ATOMIC_BATCH_DUPLICATE_ID: Final = 10201
"""An atomic batch holds a `Nats-Msg-Id` seen within the duplicate window; nothing stored."""

STREAM_NAME_IN_USE: Final = 10058
"""A stream with that name exists (with another configuration)."""
STREAM_NOT_FOUND: Final = 10059
"""No stream with that name."""
ATOMIC_PUBLISH_TOO_MANY_INFLIGHT: Final = 10210
"""More atomic batches in flight on the stream than the server allows (HTTP 429): wait."""
STREAM_STORE_FAILED: Final = 10077
"""The stream refused to store (maximum messages, bytes or messages per subject with discard
new): a 503 that waiting does not cure."""

CLUSTER_NO_PEERS: Final = 10005
"""No suitable peers for placement (too few servers online for the replicas asked)."""
CLUSTER_NOT_AVAILABLE: Final = 10008
"""JetStream system temporarily unavailable."""
CLUSTER_NOT_LEADER: Final = 10009
"""JetStream cluster can not handle the request (no meta leader yet)."""
MAXIMUM_STREAMS: Final = 10027
"""The account may create no more streams."""
NOT_ENABLED_FOR_ACCOUNT: Final = 10039
"""JetStream is not enabled for the account."""
STORAGE_EXCEEDED: Final = 10047
"""Insufficient storage resources (the stream's `max_bytes` does not fit the server/account)."""
STREAM_INVALID_CONFIG: Final = 10052
"""The server found the stream configuration invalid."""
SUBJECT_OVERLAP: Final = 10065
"""Another stream already takes (some of) the subjects."""
REPLICAS_NOT_SUPPORTED: Final = 10074
"""Replicas > 1 on a server that is not in a cluster."""
NOT_ENABLED: Final = 10076
"""JetStream is not enabled on the server."""

_CREATE_ADVICE: Final = {
    REPLICAS_NOT_SUPPORTED: "a single server keeps one copy: use replicas=1, or run a JetStream "
    "cluster",
    STORAGE_EXCEEDED: "the server or account has less file storage than max_bytes asks for: "
    "lower max_bytes, or raise the server's max_file_store / the account's limit",
    MAXIMUM_STREAMS: "the account has reached its stream limit: delete unused streams or raise "
    "the limit",
    SUBJECT_OVERLAP: "another stream already takes these subjects: use another prefix, or remove "
    "that stream",
    NOT_ENABLED: "start nats-server with JetStream (-js)",
    NOT_ENABLED_FOR_ACCOUNT: "enable JetStream for the account in the server configuration",
    STREAM_INVALID_CONFIG: "check the store's options (replicas, max_age, max_bytes, "
    "duplicate_window: the window must not exceed max_age)",
}
_CREATE_TRANSIENT: Final = frozenset({CLUSTER_NO_PEERS, CLUSTER_NOT_AVAILABLE, CLUSTER_NOT_LEADER})
_PUBLISH_TRANSIENT: Final = frozenset(
    # an incomplete atomic batch is discarded whole (ADR-50): after a paused or killed leader
    # its messages may have reached two leaders; the next attempt is a new batch with the same
    # ids and expected sequence, so it stores the events once or finds them stored
    {
        CLUSTER_NOT_AVAILABLE,
        CLUSTER_NOT_LEADER,
        ATOMIC_PUBLISH_TOO_MANY_INFLIGHT,
        ATOMIC_BATCH_INCOMPLETE,
    }
)

_LAST_SEQ_RE = re.compile(r"wrong last sequence: (\d+)")


class WrongLastSequenceError(PublishRejectedError):
    """The subject's last sequence was not the expected one (err_code 10071, or 10164 without the
    sequence); nothing stored.

    It never leaves the store, which turns it into WrongExpectedVersionError (or retries).
    """

    def __init__(
        self, *, subject: str, code: int, err_code: int, description: str, last_sequence: int | None
    ) -> None:
        self.last_sequence = last_sequence
        super().__init__(subject=subject, code=code, err_code=err_code, description=description)


class BatchDuplicateIdError(PublishRejectedError):
    """An atomic batch holds a message id seen in the duplicate window (err_code 10201).

    It never leaves the store, which returns the first append's result (or DuplicateEventError).
    """


class DuplicateInProcessError(PublishRejectedError):
    """The same message id is being stored by an earlier attempt (err_code 10158); retryable:
    the next attempt gets that attempt's PubAck as a duplicate. It never leaves the store except
    inside ElectionTimeoutError."""

    retryable = True


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
    if err_code in (WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_CONSTANT):
        match = _LAST_SEQ_RE.search(text)
        return WrongLastSequenceError(
            subject=subject,
            code=code,
            err_code=err_code,
            description=text,
            last_sequence=int(match.group(1)) if match else None,
        )
    if err_code == DUPLICATE_IN_PROCESS:
        return DuplicateInProcessError(
            subject=subject, code=code, err_code=err_code, description=text
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
    if err_code != STREAM_STORE_FAILED and (err_code in _PUBLISH_TRANSIENT or code in (429, 503)):
        return PublishUnavailableError(
            subject=subject, code=code, err_code=err_code, description=text
        )
    return PublishRejectedError(subject=subject, code=code, err_code=err_code, description=text)


def client_error(operation: str, error: Exception) -> FuseError:
    """The FuseError for an exception nats-py raised during `operation`.

    A closed or draining connection never comes back (StoreConnectionClosedError); a subject,
    header or size the client refuses would be refused again (ClientRefusedError, though the
    store's own checks keep these from happening); anything else (timeout, no responders,
    reconnecting, reconnect buffer full) passes: StoreUnavailableError.
    """
    name = type(error).__name__
    if isinstance(error, nats_errors.ConnectionClosedError | nats_errors.ConnectionDrainingError):
        return StoreConnectionClosedError(operation=operation, reason=f"{name}: {error}")
    if isinstance(
        error,
        nats_errors.BadSubjectError | nats_errors.BadHeaderError | nats_errors.MaxPayloadError,
    ):
        return ClientRefusedError(operation=operation, reason=f"{name} {error}".strip())
    return StoreUnavailableError(operation=operation, reason=f"{name} {error}".strip())


def refused_error(operation: str, error: ApiError) -> FuseError:
    """The FuseError for a JetStream API error answered to a request other than a publish
    (stream info, consumer create): retryable for a passing condition, else permanent."""
    code, err_code, text = error.code, error.err_code, error.description
    if code in (429, 503) or err_code in _CREATE_TRANSIENT:
        return StoreUnavailableError(
            operation=operation, reason=f"JetStream: {text} (status {code}, err_code {err_code})"
        )
    return JetStreamRefusedError(
        operation=operation, code=code, err_code=err_code, description=text
    )


def placement_error(stream: str, *, replicas: int, nodes: int) -> StreamCreateError:
    """The permanent error for a stream that asks for more copies than the cluster has nodes."""
    return StreamCreateError(
        stream=stream,
        code=400,
        err_code=CLUSTER_NO_PEERS,
        description=f"{replicas} replicas asked for, the cluster has {nodes} node(s)",
        advice=f"ask for at most {nodes} (FUSE_REPLICAS, --replicas, replicas=), or leave the "
        f"count unset to let the store choose; adding nodes also helps",
    )


def stream_create_error(stream: str, error: ApiError) -> StreamCreateError:
    """The FuseError for a JetStream API error answered to creating (or looking up) `stream`.

    A passing condition (status 503, no leader, peers offline) gives the retryable
    StreamCreateUnavailableError; anything else a StreamCreateError that says what to change.
    """
    code, err_code, text = error.code, error.err_code, error.description
    if code == 503 or err_code in _CREATE_TRANSIENT:
        return StreamCreateUnavailableError(
            stream=stream,
            code=code,
            err_code=err_code,
            description=text,
            advice="the JetStream cluster is not ready (no leader, or peers offline): retry "
            "shortly",
        )
    advice = _CREATE_ADVICE.get(
        err_code, "check the server's JetStream limits and the store's options"
    )
    return StreamCreateError(
        stream=stream, code=code, err_code=err_code, description=text, advice=advice
    )
