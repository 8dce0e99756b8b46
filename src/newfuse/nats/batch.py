"""JetStream atomic batch publish (ADR-50) on the raw nats-py client, which has no helper for it.

The first message carries `Nats-Batch-Id` and `Nats-Batch-Sequence: 1` and is sent as a request
(the server answers with an empty body, or an error if the stream cannot take batches); the next
ones increase the sequence and are published without a reply; the last carries
`Nats-Batch-Commit: 1` and is answered with a PubAck holding `batch` and `count`. The server
stores all messages or none, checking expected-sequence headers at commit time against the
stream as it was before the batch; it abandons a batch idle for 10 s, so a client that dies
mid-batch leaves nothing behind. Findings from probing nats-server 2.15 (see the tests):
- `Nats-Msg-Id` is allowed on every message; a message id seen within the duplicate window
  rejects the whole batch with err_code 10201 (no `duplicate` PubAck as for single publishes);
- `Nats-Expected-Last-Subject-Sequence` belongs on the first message of the subject only: on a
  later message of the same subject the server checks it against the stream before the batch;
- with `allow_atomic` off the first message is already refused (err_code 10174).
"""

from __future__ import annotations

from collections.abc import Sequence

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.nuid import NUID

from newfuse.errors import BatchTooLargeError, PublishTimeoutError, StoreUnavailableError
from newfuse.nats import headers
from newfuse.nats.connection import guarded
from newfuse.nats.jserrors import PubAck, client_error, decode_pub_ack
from newfuse.nats.signing import signed

MAX_BATCH_MESSAGES = 1000
"""The server's limit of messages in one atomic batch (ADR-50 default)."""

BATCH_HEADER_BYTES = sum(
    len(name) + 4 + size
    for name, size in (
        (headers.BATCH_ID, 22),  # a NUID
        (headers.BATCH_SEQUENCE, len(str(MAX_BATCH_MESSAGES))),
        (headers.BATCH_COMMIT, 1),
    )
)
"""Most bytes the batch headers add to one message (what it counts against `max_payload`)."""

_nuid = NUID()


async def publish_atomic_batch(
    nc: Client,
    messages: Sequence[tuple[str, bytes, dict[str, str]]],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline per server answer, as in nats.py
    server_version: str = "",
) -> PubAck:
    """Publish `messages` as one atomic batch: the stream stores all of them or none.

    Args:
        nc: a connected client.
        messages: (subject, body, headers) in order; the headers are extended with the batch
            headers (the caller's dicts are not changed).
        timeout: seconds to wait for each of the two answers (first message, commit).
        server_version: named in AtomicBatchUnsupportedError.

    Returns:
        The commit's PubAck: `seq` is the last message's stream sequence, `count` the number of
        messages; the batch's sequences are consecutive.

    Raises:
        AtomicBatchUnsupportedError: the stream has `allow_atomic` off.
        WrongLastSequenceError: an expected-sequence header did not hold; nothing stored.
        BatchDuplicateIdError: a message id was seen within the duplicate window.
        PublishRejectedError: any other refusal.
        PublishTimeoutError: no answer in time; the batch may or may not be stored.
        StoreUnavailableError: no stream answered (server restarting, stream deleted).
        BatchTooLargeError: more than 1000 messages.
    """
    count = len(messages)
    if count == 0:
        raise ValueError("an atomic batch needs at least one message")
    first_subject = messages[0][0]
    if count > MAX_BATCH_MESSAGES:
        raise BatchTooLargeError(stream=first_subject, size=count, limit=MAX_BATCH_MESSAGES)
    batch_id = _nuid.next().decode()
    last = count - 1
    for index, (subject, body, base) in enumerate(messages):
        with_batch = dict(signed(nc, subject, body, base))  # the caller's dict stays
        with_batch[headers.BATCH_ID] = batch_id
        with_batch[headers.BATCH_SEQUENCE] = str(index + 1)
        if index == last:
            with_batch[headers.BATCH_COMMIT] = "1"
            answer = await _request(nc, subject, body, with_batch, timeout)
            return decode_pub_ack(answer, subject=subject, server_version=server_version)
        if index == 0:
            # The first answer tells us early whether the stream takes batches at all.
            answer = await _request(nc, subject, body, with_batch, timeout)
            if answer:
                decode_pub_ack(answer, subject=subject, server_version=server_version)
        else:
            try:
                await nc.publish(subject, body, headers=with_batch)
            except NatsError as error:  # nothing is stored: the batch never commits
                raise client_error(f"publish to {subject!r}", error) from None
    raise AssertionError("unreachable")  # pragma: no cover


async def _request(
    nc: Client, subject: str, body: bytes, sent: dict[str, str], wait: float
) -> bytes:
    try:
        msg = await guarded(nc, subject, nc.request(subject, body, timeout=wait, headers=sent))
    except NatsTimeoutError:
        raise PublishTimeoutError(subject=subject, timeout=wait) from None
    except NoRespondersError:
        raise StoreUnavailableError(
            operation=f"publish to {subject!r}",
            reason="no JetStream stream answered (is the server restarting, or the stream gone?)",
        ) from None
    except NatsError as error:  # closed, or the reconnect buffer is full
        raise client_error(f"publish to {subject!r}", error) from None
    data: bytes = msg.data
    return data
