"""The events every event store benchmark appends and reads, and the ways they are written."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec
from _harness import progress, run_id, timed
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from newfuse.eventstore import NO_STREAM, EventStore
from newfuse.nats import headers as fuse_headers
from newfuse.schemas import Envelope, NewEvent, StateUpdate, new_event_id, utcnow

TYPE = "agent.state_update"

_PAYLOAD_ENCODER = msgspec.json.Encoder()
_BODY_ENCODER = msgspec.json.Encoder()
_ENVELOPE_DECODER = msgspec.json.Decoder(Envelope)
_PAYLOAD_DECODER = msgspec.json.Decoder(StateUpdate)


def payload(i: int) -> StateUpdate:
    """The payload every phase appends: a typed state update of about 200 bytes."""
    return StateUpdate(
        agent_id=f"agent-{i % 1000}",
        state={"step": "plan", "turn": i, "note": "n" * 100},
        version=i,
    )


def new_event(i: int) -> NewEvent:
    """What our store is given: a registered payload struct, the store encodes it."""
    return NewEvent(data=payload(i), correlation_id=f"conv-{i % 100}")


def wire_body(stream: str, version: int, i: int) -> tuple[str, bytes]:
    """(event id, body) for a baseline: the same envelope JSON our store writes for `new_event(i)`.

    The baselines get their bytes encoded in advance, so they do strictly less work than we do.
    """
    event_id = new_event_id()
    envelope = Envelope(
        id=event_id,
        stream=stream,
        type=TYPE,
        schema_version=1,
        version=version,
        timestamp=utcnow(),
        correlation_id=f"conv-{i % 100}",
        data=msgspec.Raw(_PAYLOAD_ENCODER.encode(payload(i))),
    )
    return event_id, _BODY_ENCODER.encode(envelope)


def decode_typed(body: bytes) -> StateUpdate:
    """The baselines' typed decode: envelope, then payload into its struct (what read_all does)."""
    envelope = _ENVELOPE_DECODER.decode(body)
    return _PAYLOAD_DECODER.decode(envelope.data)


# -- headers: the raw publisher sends what our store sends ----------------------------------------


class HeaderTemplate:
    """The headers our store put on one captured message, turned into a per-message recipe.

    Values equal to the event id, the stream or the stream version are replaced per message; the
    expected-last-subject-sequence header carries the raw publisher's own last ack sequence; a
    batch id is made unique; anything else is copied verbatim.
    """

    def __init__(self, captured: dict[str, str], *, event_id: str, stream: str, version: int):
        self.captured = dict(captured)
        self.kinds: list[tuple[str, str, str]] = []
        for name, value in captured.items():
            if name == fuse_headers.EXPECTED_LAST_SUBJECT_SEQUENCE:
                kind = "seq"
            elif name == fuse_headers.BATCH_ID:
                kind = "unique"
            elif value == event_id:
                kind = "id"
            elif value == stream:
                kind = "stream"
            elif value == str(version):
                kind = "version"
            else:
                kind = "const"
            self.kinds.append((name, kind, value))

    def build(self, *, event_id: str, stream: str, version: int, last_seq: int) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, kind, value in self.kinds:
            if kind == "seq":
                headers[name] = str(last_seq)
            elif kind == "unique":
                headers[name] = uuid.uuid4().hex
            elif kind == "id":
                headers[name] = event_id
            elif kind == "stream":
                headers[name] = stream
            elif kind == "version":
                headers[name] = str(version)
            else:
                headers[name] = value
        return headers


async def capture_headers(store: EventStore, nc: NatsClient, prefix: str) -> HeaderTemplate:
    """Append three events with our store and keep the headers of the third as it went out."""
    stream = f"bench.capture-{uuid.uuid4().hex[:8]}"
    seen: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        await seen.put(msg)

    sub = await nc.subscribe(f"{prefix}.ev.{stream}", cb=on_message)
    await nc.flush()
    version = 0
    for i in range(3):
        version = (await store.append(stream, new_event(i), version)).version
    msg: Msg | None = None
    for _ in range(3):
        msg = await asyncio.wait_for(seen.get(), 10)
    await sub.unsubscribe()
    assert msg is not None
    envelope = _ENVELOPE_DECODER.decode(msg.data)
    headers = dict(msg.headers or {})
    progress(f"our store publishes with headers: {sorted(headers)}")
    return HeaderTemplate(headers, event_id=envelope.id, stream=stream, version=envelope.version)


async def ours_append_concurrent(store: EventStore, streams: int, total: int) -> tuple[int, float]:
    """`streams` appenders, one event per call, each with the expected version of its stream."""
    per = max(1, total // streams)
    rid = run_id()
    batches = [[new_event(s * per + i) for i in range(per)] for s in range(streams)]

    async def writer(s: int) -> None:
        name = f"bench.{rid}-{s}"
        version = 0
        for event in batches[s]:
            version = (await store.append(name, event, version)).version

    async def run() -> int:
        await asyncio.gather(*(writer(s) for s in range(streams)))
        return per * streams

    return await timed(run)


async def populate(store: EventStore, total: int, stream_size: int, label: str) -> list[str]:
    """Append `total` events with our store, `stream_size` per stream, in batches, 8 in flight."""
    plan = [
        (f"bench.{label}-{s}", min(stream_size, total - start))
        for s, start in enumerate(range(0, total, stream_size))
    ]
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    batch = min(stream_size, 500)
    done = 0
    next_report = time.monotonic() + 5

    async def worker() -> None:
        nonlocal done, next_report
        while not queue.empty():
            stream, size = queue.get_nowait()
            written = 0
            while written < size:
                chunk = [new_event(written + i) for i in range(min(batch, size - written))]
                await store.append(stream, chunk, written if written else NO_STREAM)
                written += len(chunk)
                done += len(chunk)
            if time.monotonic() > next_report:
                progress(f"  populated {done:,}/{total:,}")
                next_report = time.monotonic() + 5

    await asyncio.gather(*(worker() for _ in range(8)))
    return [stream for stream, _ in plan]


async def populate_raw(
    js: JetStreamContext, prefix: str, total: int, stream_size: int, label: str
) -> None:
    """Fill a JetStream log fast for the read phases: pipelined `publish_async`, valid envelopes.

    Each stream is written in order by this one publisher, so versions are right without
    expected-sequence headers; the read phases measure reading, not this.
    """
    futures: list[asyncio.Future[Any]] = []
    next_report = time.monotonic() + 5
    for s, start in enumerate(range(0, total, stream_size)):
        stream = f"bench.{label}-{s}"
        subject = f"{prefix}.ev.{stream}"
        for i in range(min(stream_size, total - start)):
            event_id, body = wire_body(stream, i + 1, start + i)
            headers = {
                fuse_headers.MSG_ID: event_id,
                fuse_headers.TYPE: TYPE,
                fuse_headers.SCHEMA_VERSION: "1",
                fuse_headers.STREAM_VERSION: str(i + 1),
            }
            futures.append(await js.publish_async(subject, body, headers=headers))
        if len(futures) >= 10_000:
            await asyncio.gather(*futures)
            futures.clear()
        if time.monotonic() > next_report:
            progress(f"  published {start + stream_size:,}/{total:,}")
            next_report = time.monotonic() + 5
    await asyncio.gather(*futures)


async def ours_read_all(store: EventStore, expected: int) -> int:
    count = 0
    async for event in store.read_all():
        if not isinstance(event.data, StateUpdate):
            raise AssertionError(f"read_all gave {type(event.data).__name__}, not StateUpdate")
        count += 1
    if count != expected:
        raise AssertionError(f"read_all read {count} events, {expected} were appended")
    return count
