"""Generated hostile publishes (raw nats-py, with and without our headers, forged ones included)
interleaved with honest appends on a live JetStream store while a projection runner runs: every
honest event is still read (read, read_all, subscribe) and projected, every stored hostile
message is either reported with its position or, when it happens to be a valid event in its
place, delivered like one; and every stream's versions stay 1, 2, 3, ..."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from nats.errors import MaxPayloadError
from nats.js.errors import APIError

from newfuse.eventstore import EventFilter, InvalidEventReport
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.projections import Projection, ProjectionRunner, RedisBatch, RedisReadModel
from newfuse.schemas import MAX_NESTING_DEPTH, NewEvent, RecordedEvent
from support import new_prefix

SEED = int(os.environ.get("FUSE_HYPOTHESIS_SEED") or random.randrange(2**32))
print(f"hostile property test seed: {SEED} (FUSE_HYPOTHESIS_SEED={SEED} repeats it)")

STREAMS = ("agent.x1", "agent.x2", "saga.x3")
FIELDS = ("id", "stream", "type", "schema_version", "version", "timestamp", "metadata", "data")

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def envelope_like(draw: st.DrawFn) -> bytes:
    """A JSON object shaped like an envelope, each field right, wrong or missing."""
    stream = draw(st.sampled_from((*STREAMS, "agent.other", "", "a b.c")))
    head: dict[str, Any] = {
        "id": draw(st.one_of(st.text(max_size=8), st.integers())),
        "stream": stream,
        "type": draw(st.sampled_from(("note", "agent.state_update", "", "bad type", "a..b"))),
        "schema_version": draw(st.integers(min_value=-2, max_value=2**64)),
        "version": draw(st.integers(min_value=-1, max_value=12) | st.integers(max_value=2**70)),
        "timestamp": draw(st.sampled_from(("2026-12-02T12:00:00Z", "yesterday", 7))),
        "metadata": draw(st.dictionaries(st.text(max_size=3), json_scalar, max_size=2)),
        "data": draw(json_value),
    }
    for field in draw(st.sets(st.sampled_from(FIELDS))):
        head.pop(field)
    return msgspec.json.encode(head)


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(min_value=MAX_NESTING_DEPTH, max_value=20_000))
    opener, closer = draw(st.sampled_from(((b"[", b"]"), (b'{"a":', b"}"))))
    inner = opener * depth + b"1" * (opener != b"[") + closer * depth * draw(st.booleans())
    return (
        b'{"id":"d","stream":"agent.x1","type":"note","version":1,'
        b'"timestamp":"2026-12-02T12:00:00Z","data":' + inner + b"}"
    )


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """An envelope-like body in another encoding, with a BOM, NULs or bytes cut out."""
    body = draw(envelope_like())
    how = draw(st.sampled_from(("utf-16", "bom", "nul", "cut", "bad-utf8")))
    if how == "utf-16":
        return body.decode().encode("utf-16")
    if how == "bom":
        return b"\xef\xbb\xbf" + body
    if how == "nul":
        return body.replace(b'"', b'"\x00', 1)
    if how == "bad-utf8":
        return body.replace(b'"', b'"\xc3(', 2)
    return body[: draw(st.integers(min_value=0, max_value=max(len(body) - 1, 0)))]


big = st.integers(min_value=1, max_value=1024 * 1024 + 16).map(
    lambda n: b'{"data":"' + b"x" * n + b'"}'
)
hostile_body = st.one_of(
    st.binary(max_size=300), envelope_like(), deep(), mangled(), big, st.just(b"")
)
header_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12)
forged_headers = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "Nats-Msg-Id": header_text,
            "Fuse-Type": st.sampled_from(("note", "agent.state_update", "x y")),
            "Fuse-Schema-Version": header_text,
            "Fuse-Stream-Version": st.integers(min_value=0, max_value=99).map(str),
            "traceparent": header_text,
        },
    ),
)
honest = st.tuples(st.just("honest"), st.sampled_from(STREAMS), st.none(), st.none())
hostile = st.tuples(st.just("hostile"), st.sampled_from(STREAMS), hostile_body, forged_headers)
operations = st.lists(st.one_of(honest, hostile), min_size=1, max_size=20)


def counter() -> Projection[RedisBatch]:
    projection: Projection[RedisBatch] = Projection("hostile_counter")

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        batch.rpush(batch.key("applied"), event.position)

    return projection


@pytest.mark.slow
@seed(SEED)
@settings(
    max_examples=40,
    deadline=None,  # a live server under a shared machine's load; the suite's timeout bounds it
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
    phases=[Phase.generate, Phase.shrink],  # no explain: it traces every line (slow before 3.12)
)
@given(ops=operations)
async def test_hostile_publishes_never_cost_an_honest_event(
    ops: list[tuple[str, str, bytes | None, dict[str, str] | None]],
    nats_url: str,
    redis_url: str,
) -> None:
    prefix = new_prefix("p")
    reports: list[InvalidEventReport] = []
    nc = await nats.connect(nats_url)
    store = await JetStreamEventStore.connect(nats_url, prefix=prefix, on_invalid=reports.append)
    model = await RedisReadModel.connect(redis_url, root=f"{prefix}:proj")
    runner = ProjectionRunner(counter(), store, model)
    await store.ensure_stream()
    honest_positions: list[int] = []
    hostile_positions: set[int] = set()
    try:
        await runner.start()
        for n, (kind, stream, body, headers) in enumerate(ops):
            if kind == "honest":
                result = await store.append(stream, NewEvent(type="note", data={"n": n}))
                honest_positions.append(result.position)
                continue
            assert body is not None
            try:
                ack = await nc.jetstream().publish(
                    f"{prefix}.ev.{stream}", body, headers=headers or None
                )
            except (MaxPayloadError, APIError):  # refused by the client or server: not stored
                continue
            if not ack.duplicate:
                hostile_positions.add(ack.seq)

        everything = [event async for event in store.read_all()]
        delivered = {event.position for event in everything}
        reported = {report.position for report in reports}
        assert set(honest_positions) <= delivered
        assert hostile_positions <= delivered | reported
        assert not (delivered & reported)
        for stream in STREAMS:
            versions = [event.version async for event in store.read(stream)]
            assert versions == list(range(1, len(versions) + 1))
            assert versions == [e.version for e in everything if e.stream == stream]
        live: list[int] = []
        if everything:
            async with asyncio.timeout(20), store.subscribe(EventFilter()) as subscription:
                async for event in subscription:
                    live.append(event.position)
                    if event.position == everything[-1].position:
                        break
        assert live == [event.position for event in everything]
        notes = [event.position for event in everything if event.type == "note"]
        if notes:
            await runner.wait_until(notes[-1], timeout=20)
        assert runner.state != "failed", runner.last_error
        generation = await model.active_generation("hostile_counter")
        applied: list[bytes] = []
        if generation is not None:
            key = model.model_prefix("hostile_counter", generation) + "applied"
            applied = await model.client.lrange(key, 0, -1)  # type: ignore[misc]
        assert [int(position) for position in applied] == notes
    finally:
        await runner.stop()
        await model.close()
        await store.close()
        await nc.jetstream().delete_stream(store.stream_name)
        await nc.close()
