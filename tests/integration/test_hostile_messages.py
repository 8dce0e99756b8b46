"""What a foreign client can publish on `<prefix>.ev.>` never stops a reader, and an envelope must
agree with its place in the log: its subject's stream, and the previous valid event's version + 1.

Every case publishes raw bytes with nats-py onto a live JetStream store, next to honest appends,
and reads them back through every reader (read, read_all, subscribe, a cold store, the built-in
projections as `fuse dev` runs them)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from newfuse.eventstore import NO_STREAM, EventFilter, InvalidEventReport
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.projections import RedisReadModel, SQLiteReadModel
from newfuse.projections.builtin import BuiltinProjections
from newfuse.schemas import MAX_NESTING_DEPTH, NewEvent, SchemaRegistry, StateUpdate

STAMP = "2026-12-02T12:00:00Z"


def note(n: int) -> NewEvent:
    return NewEvent(type="note", data={"n": n})


def envelope(stream: str, version: int, data: bytes = b'{"n":-1}', **fields: object) -> bytes:
    """A well-formed envelope body, built as a foreign publisher would (bytes, not our encoder)."""
    head = {"id": f"foreign-{version}", "stream": stream, "type": "note", "version": version}
    head.update({"timestamp": STAMP, **fields})
    return msgspec.json.encode(head)[:-1] + b',"data":' + data + b"}"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# One per class of hostile body: (name, body given the stream and its honest version so far).
HOSTILE: list[tuple[str, Callable[[str, int], bytes]]] = [
    ("deep arrays in data", lambda s, v: envelope(s, v + 1, nested(5000))),
    ("deep objects in data", lambda s, v: envelope(s, v + 1, b'{"a":' * 3000 + b"1" + b"}" * 3000)),
    ("unbalanced deep brackets", lambda s, v: b'{"data":' + b"[" * 200_000),
    ("just over the depth limit", lambda s, v: envelope(s, v + 1, nested(MAX_NESTING_DEPTH + 1))),
    ("a huge version", lambda s, v: envelope(s, 10**30)),
    ("a huge schema_version", lambda s, v: envelope(s, v + 1, schema_version=10**30)),
    ("a byte-order mark", lambda s, v: b"\xef\xbb\xbf" + envelope(s, v + 1)),
    ("UTF-16", lambda s, v: envelope(s, v + 1).decode().encode("utf-16")),
    ("a raw NUL", lambda s, v: envelope(s, v + 1, b'"a\x00b"')),
    (
        "invalid UTF-8 in the envelope",
        lambda s, v: envelope(s, v + 1).replace(b"foreign", b"\xc3("),
    ),
    ("empty body", lambda s, v: b""),
    ("not JSON", lambda s, v: b"{not an envelope"),
    ("a JSON array", lambda s, v: b"[1,2,3]"),
    ("another stream's envelope", lambda s, v: envelope("agent.elsewhere", v + 1)),
    ("a version that repeats", lambda s, v: envelope(s, v)),
    ("a version that skips", lambda s, v: envelope(s, v + 5)),
    ("an invalid type name", lambda s, v: envelope(s, v + 1, type="no spaces allowed")),
]
# Valid envelopes in their place whose payload no reader can decode: reported and skipped, but
# they hold their version (the place in the log is the envelope's; payloads are each reader's).
BAD_PAYLOAD: list[tuple[str, Callable[[str, int], bytes]]] = [
    ("a 5000-digit integer", lambda s, v: envelope(s, v + 1, b"1" * 5000)),
    ("a number beyond float", lambda s, v: envelope(s, v + 1, b"1e400")),
    ("invalid UTF-8 in data", lambda s, v: envelope(s, v + 1, b'"\xff\xfe"')),
    (
        "a registered type at an unknown schema version",
        lambda s, v: envelope(s, v + 1, b"{}", type="agent.state_update", schema_version=99),
    ),
    (
        "a registered type with a wrong payload",
        lambda s, v: envelope(s, v + 1, b'{"agentId": 5}', type="agent.state_update"),
    ),
]


@pytest.fixture
async def store(nats_url: str, prefix: str) -> AsyncIterator[JetStreamEventStore]:
    async with await JetStreamEventStore.connect(nats_url, prefix=prefix) as opened:
        yield opened


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def publish(nc: nats.NATS, prefix: str, stream: str, body: bytes, **headers: str) -> int:
    ack = await nc.jetstream().publish(f"{prefix}.ev.{stream}", body, headers=headers or None)
    return ack.seq


CASES = [(name, make, False) for name, make in HOSTILE] + [
    (name, make, True) for name, make in BAD_PAYLOAD
]


@pytest.mark.parametrize(("name", "make", "holds"), CASES, ids=[name for name, _, _ in CASES])
async def test_a_hostile_body_is_reported_with_its_position_and_every_reader_goes_on(
    store: JetStreamEventStore,
    nc: nats.NATS,
    nats_url: str,
    prefix: str,
    name: str,
    make: Callable[[str, int], bytes],
    holds: bool,
) -> None:
    reports: list[InvalidEventReport] = []
    store.on_invalid = reports.append
    stream = "agent.h1"
    await store.append(stream, [note(1), note(2)], NO_STREAM)
    bad = await publish(nc, prefix, stream, make(stream, 2))
    top = 4 if holds else 3  # a foreign message out of place does not count
    after = await store.append(stream, note(3), top - 1)
    assert after.version == top and after.position == bad + 1
    versions = [1, 2, top]

    assert [(e.version, e.data["n"]) async for e in store.read(stream)] == [
        (1, 1),
        (2, 2),
        (top, 3),
    ]
    assert [e.version async for e in store.read(stream, backwards=True)] == versions[::-1]
    assert [e.version async for e in store.read_all()] == versions
    seen = []
    async with store.subscribe(EventFilter(streams=(stream,))) as live:
        async for event in live:
            seen.append(event.version)
            if len(seen) == 3:
                break
    assert seen == versions
    assert {r.position for r in reports} == {bad}
    assert all(r.where == f"on {prefix}.ev.{stream}" for r in reports)
    async with await JetStreamEventStore.connect(nats_url, prefix=prefix) as cold:  # a restart
        assert await cold.stream_version(stream) == top
        assert (await cold.append(stream, note(4), top)).version == top + 1


async def test_the_depth_limit_is_exact_and_named(
    store: JetStreamEventStore, nc: nats.NATS, prefix: str
) -> None:
    reports: list[InvalidEventReport] = []
    store.on_invalid = reports.append
    await publish(nc, prefix, "agent.d1", envelope("agent.d1", 1, nested(MAX_NESTING_DEPTH)))
    await publish(nc, prefix, "agent.d1", envelope("agent.d1", 2, nested(MAX_NESTING_DEPTH + 1)))
    [event] = [e async for e in store.read("agent.d1")]
    assert event.version == 1
    assert f"may nest at most {MAX_NESTING_DEPTH} deep" in reports[0].error
    assert f"the body nests {MAX_NESTING_DEPTH + 2} deep" in reports[0].error


async def test_versions_1_2_3_1_7_read_as_1_2_3_and_the_next_append_gets_4(
    store: JetStreamEventStore, nc: nats.NATS, nats_url: str, prefix: str
) -> None:
    reports: list[InvalidEventReport] = []
    store.on_invalid = reports.append
    await store.append("agent.v1", [note(1), note(2), note(3)], NO_STREAM)
    one = await publish(nc, prefix, "agent.v1", envelope("agent.v1", 1))
    seven = await publish(nc, prefix, "agent.v1", envelope("agent.v1", 7))
    async with await JetStreamEventStore.connect(nats_url, prefix=prefix) as cold:
        assert await cold.stream_version("agent.v1") == 3
        assert (await cold.append("agent.v1", note(4))).version == 4
    assert (await store.append("agent.v1", note(5), 4)).version == 5
    assert [e.version async for e in store.read("agent.v1")] == [1, 2, 3, 4, 5]
    assert [r.position for r in reports] == [one, seven]
    assert "version 1 does not follow version 3" in reports[0].error
    assert "version 7 does not follow version 3" in reports[1].error


async def test_a_forged_stream_version_header_does_not_move_the_stream(
    store: JetStreamEventStore, nc: nats.NATS, nats_url: str, prefix: str
) -> None:
    await store.append("agent.fh", note(1), NO_STREAM)
    forged = {"Fuse-Stream-Version": "7", "Fuse-Type": "note", "Nats-Msg-Id": "forged-1"}
    await publish(nc, prefix, "agent.fh", b"garbage", **forged)
    async with await JetStreamEventStore.connect(nats_url, prefix=prefix) as cold:
        assert await cold.stream_version("agent.fh") == 1
        assert (await cold.append("agent.fh", note(2), 1)).version == 2


async def test_a_valid_foreign_envelope_in_its_place_counts_like_our_own(
    store: JetStreamEventStore, nc: nats.NATS, prefix: str
) -> None:
    await store.append("agent.ok", note(1), NO_STREAM)
    await publish(nc, prefix, "agent.ok", envelope("agent.ok", 2, b'{"n":2}'))
    assert (await store.append("agent.ok", note(3), 2)).version == 3
    assert [e.data["n"] async for e in store.read("agent.ok")] == [1, 2, 3]


async def test_read_all_from_the_start_checks_every_streams_versions(
    store: JetStreamEventStore, nc: nats.NATS, prefix: str
) -> None:
    reports: list[InvalidEventReport] = []
    store.on_invalid = reports.append
    first = await publish(nc, prefix, "agent.ra", envelope("agent.ra", 2))  # no version 1 yet
    await store.append("agent.ra", note(1), NO_STREAM)
    assert [e.version async for e in store.read_all()] == [1]
    assert [r.position for r in reports] == [first]


async def test_the_builtin_projections_survive_every_hostile_body_and_project_the_honest_events(
    store: JetStreamEventStore, nc: nats.NATS, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """What `fuse dev` runs: the agent-state and audit projections, live, then a fresh pair that
    replays the whole log (a restart with empty read models)."""
    reports: list[InvalidEventReport] = []
    store.on_invalid = reports.append
    last = 0
    for round_ in range(2):
        redis = await RedisReadModel.connect(redis_url, root=f"{prefix}:proj{round_}")
        builtin = BuiltinProjections(
            redis, await SQLiteReadModel.open(str(tmp_path / f"audit{round_}.db"))
        )
        try:
            runners = [await runner.start() for runner in builtin.runners(store)]
            if round_ == 0:
                for index, (_, make, _) in enumerate(CASES):
                    stream = f"agent.p{index}"
                    update = StateUpdate(agent_id=f"p{index}", state={"i": index}, version=1)
                    await store.append(stream, NewEvent(data=update), NO_STREAM)
                    await publish(nc, prefix, stream, make(stream, 1))
                    last = (await store.append(stream, note(index))).position
            for runner in runners:
                assert await runner.wait_until(last, timeout=30) >= last
                assert runner.state in ("running", "waiting"), runner.last_error
                assert runner.dead_letter_count == 0
            for runner in runners:
                await runner.stop()
        finally:
            await builtin.close()
        with contextlib.closing(sqlite3.connect(tmp_path / f"audit{round_}.db")) as audit:
            [(count,)] = audit.execute("SELECT count(*) FROM audit_events").fetchall()
        assert count == 2 * len(CASES)  # every honest event, on both rounds
    assert len({r.position for r in reports}) == len(CASES)


async def test_a_payload_whose_upcaster_fails_is_reported_and_the_next_events_are_read(
    nc: nats.NATS, nats_url: str, prefix: str
) -> None:
    registry = SchemaRegistry()

    @registry.register("order.placed", 2)
    class OrderPlaced(msgspec.Struct, frozen=True, kw_only=True):
        cents: int

    @registry.upcaster("order.placed", 1)
    def _v1_to_v2(v1: dict[str, Any]) -> dict[str, Any]:
        return {"cents": round(v1["amount"] * 100)}  # a v1 without `amount` makes it raise

    reports: list[InvalidEventReport] = []
    async with await JetStreamEventStore.connect(
        nats_url, prefix=prefix, registry=registry, on_invalid=reports.append
    ) as store:
        body = envelope("shop.o1", 1, b'{"amount": "lots"}', type="order.placed")
        bad = await publish(nc, prefix, "shop.o1", body)
        await store.append("shop.o1", NewEvent(data=OrderPlaced(cents=5)), 1)
        assert [e.data async for e in store.read("shop.o1")] == [OrderPlaced(cents=5)]
        assert [e.data async for e in store.read_all()] == [OrderPlaced(cents=5)]
    assert [r.position for r in reports] == [bad, bad]
    assert "upcaster v1->v2" in reports[0].error and "TypeError" in reports[0].error


async def test_a_message_on_a_subject_that_names_no_stream_is_reported_not_delivered(
    store: JetStreamEventStore, nc: nats.NATS, prefix: str
) -> None:
    reports: list[InvalidEventReport] = []
    store.on_invalid = reports.append
    await store.append("agent.s1", note(1), NO_STREAM)
    deeper = await publish(nc, prefix, "agent.s1.x", envelope("agent.s1.x", 1))
    assert [e.stream async for e in store.read_all()] == ["agent.s1"]
    assert [e.stream async for e in store.read_all(filter=EventFilter(categories=("agent",)))] == [
        "agent.s1"
    ]
    assert {r.position for r in reports} == {deeper}
    assert "invalid stream id 's1.x': it contains a dot" in reports[0].error
