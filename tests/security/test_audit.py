"""The tamper-evident audit trail on both backends: checkpoints sign the log's Merkle root, and
`verify` names the first position where history was changed, deleted, reordered or inserted.

Tampering is done the way an attacker with access would: SQL on the SQLite file, the JetStream
API (a message deleted, a message "rewritten" as delete + republish) on the server."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from newfuse.errors import SignedNoteError
from newfuse.eventstore import EventStore, open_event_store
from newfuse.schemas import AuditCheckpoint, NewEvent, StateUpdate
from newfuse.security import CHECKPOINTS, SigningKey, checkpoint, origin_of, verify
from newfuse.security.audit import MAX_LEAVES, leaf_of, read_checkpoints
from newfuse.security.merkle import Frontier


def update(n: int) -> NewEvent:
    return NewEvent(data=StateUpdate(agent_id=f"a{n % 3}", state={"n": n}, version=n))


async def fill(store: EventStore, count: int, first: int = 0) -> None:
    for n in range(first, first + count):
        await store.append(f"agent.a{n % 3}", update(n))


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate("audit-test")


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[EventStore]:
    store = await open_event_store(f"sqlite://{tmp_path / 'log.db'}")
    yield store
    await store.close()


@pytest.fixture
async def js_store(nats_url: str, prefix: str) -> AsyncIterator[EventStore]:
    store = await open_event_store(nats_url, prefix=prefix)
    yield store
    await store.close()


@pytest.fixture(params=["sqlite", "jetstream"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, nats_url: str, prefix: str
) -> AsyncIterator[EventStore]:
    url = f"sqlite://{tmp_path / 'log.db'}" if request.param == "sqlite" else nats_url
    opened = await open_event_store(url, prefix=prefix)
    yield opened
    await opened.close()


async def test_an_untouched_log_verifies_up_to_its_last_checkpoint(
    store: EventStore, key: SigningKey
) -> None:
    await fill(store, 20)
    written = await checkpoint(store, key)
    [first] = written.checkpoints
    assert (first.size, first.last_position, first.since) == (20, 20, 0)
    assert first.note.startswith(f"{origin_of(store)}\n20\n")
    await fill(store, 5, first=20)
    report = await verify(store, [key.verifier])
    assert report.ok, report.summary()
    # the checkpoint event itself is position 21; it is covered by the next checkpoint
    assert report.summary() == (
        "verified up to position 20, checkpoint signed by audit-test; "
        "6 position(s) after it not checkpointed yet"
    )
    [second] = (await checkpoint(store, key)).checkpoints
    assert (second.since, second.size, second.last_position) == (20, 26, 26)
    report = await verify(store, [key.verifier])
    assert (report.verified_to, report.head, report.checkpoints) == (26, 27, 2)
    # nothing new but the checkpoint itself: no checkpoint of a checkpoint
    assert (await checkpoint(store, key)).checkpoints == []


async def test_the_root_is_recomputed_from_the_stored_bytes_alone(
    store: EventStore, key: SigningKey
) -> None:
    await fill(store, 7)
    [cp] = (await checkpoint(store, key)).checkpoints
    tree = Frontier()
    async for record in store.records():
        if record.position <= 7:
            tree.append(leaf_of(record))
    assert tree.root() == cp.root


async def test_a_log_without_a_trusted_checkpoint_verifies_nothing(
    store: EventStore, key: SigningKey
) -> None:
    await fill(store, 3)
    await checkpoint(store, SigningKey.generate("stranger"))
    report = await verify(store, [key.verifier])
    assert report.ok and report.checkpoints == 0
    assert report.summary() == "no trusted checkpoint: nothing verified (4 records read)"
    assert len(report.ignored) == 1 and "signed by no known key" in report.ignored[0]


async def test_a_forged_checkpoint_is_ignored_and_does_not_stop_verify(
    store: EventStore, key: SigningKey
) -> None:
    await fill(store, 4)
    await checkpoint(store, key)
    [genuine_event] = [e async for e in store.read(CHECKPOINTS)]
    genuine = genuine_event.data
    assert isinstance(genuine, AuditCheckpoint)
    forged = AuditCheckpoint(
        note=genuine.note.replace("\n4\n", "\n5\n"), last_position=5, leaves="!!", since=0
    )
    await store.append(CHECKPOINTS, NewEvent(data=forged))
    await store.append(
        CHECKPOINTS, NewEvent(data=AuditCheckpoint(note="x" * 20000, last_position=1))
    )
    report = await verify(store, [key.verifier])
    assert report.ok and report.verified_to == 4, report.summary()
    assert len(report.ignored) == 2
    assert "does not verify" in report.ignored[0] and "longer than" in report.ignored[1]


async def test_more_leaves_than_one_checkpoint_holds_take_several(
    sqlite_store: EventStore, key: SigningKey
) -> None:
    rounds = MAX_LEAVES // 500 + 2
    for round in range(rounds):
        await sqlite_store.append("agent.bulk", [update(round * 500 + n) for n in range(500)])
    written = await checkpoint(sqlite_store, key)
    assert [c.size for c in written.checkpoints] == [MAX_LEAVES, rounds * 500]
    report = await verify(sqlite_store, [key.verifier])
    assert report.ok and report.verified_to == rounds * 500


# -- SQLite: the file edited behind the store's back --------------------------------------------


def edit(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    connection = sqlite3.connect(path)
    for sql, parameters in statements:
        connection.execute(sql, parameters)
    connection.commit()
    connection.close()


async def checkpointed_file(tmp_path: Path, key: SigningKey) -> Path:
    path = tmp_path / "log.db"
    store = await open_event_store(f"sqlite://{path}")
    await fill(store, 30)
    await checkpoint(store, key)
    await store.close()
    return path


async def verify_file(path: Path, key: SigningKey) -> tuple[str, int | None, str]:
    store = await open_event_store(f"sqlite://{path}")
    try:
        report = await verify(store, [key.verifier])
    finally:
        await store.close()
    return report.status, report.position, report.detail


async def test_sqlite_a_body_rewritten_in_the_file_is_found_at_its_position(
    tmp_path: Path, key: SigningKey
) -> None:
    path = await checkpointed_file(tmp_path, key)
    row = sqlite3.connect(path).execute("SELECT body FROM events WHERE position = 12").fetchone()
    body = json.loads(row[0])
    body["data"]["state"] = {"n": "rewritten"}
    edit(path, ("UPDATE events SET body = ? WHERE position = 12", (json.dumps(body).encode(),)))
    status, position, detail = await verify_file(path, key)
    assert (status, position) == ("changed", 12), detail


async def test_sqlite_a_deleted_row_is_found(tmp_path: Path, key: SigningKey) -> None:
    path = await checkpointed_file(tmp_path, key)
    edit(path, ("DELETE FROM events WHERE position = 9", ()))
    assert (await verify_file(path, key))[:2] == ("deleted", 9)


async def test_sqlite_two_rows_swapped_are_found_as_reordered(
    tmp_path: Path, key: SigningKey
) -> None:
    path = await checkpointed_file(tmp_path, key)
    edit(
        path,
        ("UPDATE events SET position = -1 WHERE position = 5", ()),
        ("UPDATE events SET position = 5 WHERE position = 6", ()),
        ("UPDATE events SET position = 6 WHERE position = -1", ()),
    )
    status, position, detail = await verify_file(path, key)
    assert (status, position) == ("reordered", 5), detail


async def test_sqlite_a_row_inserted_is_found(tmp_path: Path, key: SigningKey) -> None:
    path = await checkpointed_file(tmp_path, key)
    # make room at 15 by moving 15.. up one (highest first), then put a forged event there
    connection = sqlite3.connect(path)
    body = connection.execute("SELECT body FROM events WHERE position = 3").fetchone()[0]
    top = connection.execute("SELECT max(position) FROM events").fetchone()[0]
    for position in range(top, 14, -1):
        connection.execute(
            "UPDATE events SET position = ? WHERE position = ?", (position + 1, position)
        )
    forged = json.loads(body)
    forged["id"] = "0192f0c1-7a1b-7c3d-8e4f-0123456789ab"
    connection.execute(
        "INSERT INTO events SELECT 15, stream, category, 99, ?, type, schema_version, "
        "timestamp, correlation_id, ? FROM events WHERE position = 3",
        (forged["id"], json.dumps(forged).encode()),
    )
    connection.commit()
    connection.close()
    status, position, detail = await verify_file(path, key)
    assert (status, position) == ("inserted", 15), detail


async def test_sqlite_a_truncated_log_is_found(tmp_path: Path, key: SigningKey) -> None:
    path = await checkpointed_file(tmp_path, key)
    edit(path, ("DELETE FROM events WHERE position >= 25 AND position <= 30", ()))
    status, position, _ = await verify_file(path, key)
    # 25..30 gone, the checkpoint (31) stays: the first gap is found
    assert (status, position) == ("deleted", 25)
    edit(path, ("DELETE FROM events WHERE position >= 20 AND stream != ?", (CHECKPOINTS,)))
    store = await open_event_store(f"sqlite://{path}")
    try:
        note = (await read_checkpoints(store, [key.verifier], origin_of(store)))[0][0].note
        edit(path, ("DELETE FROM events WHERE stream = ?", (CHECKPOINTS,)))
        report = await verify(store, [key.verifier], expected=note)
    finally:
        await store.close()
    # the checkpoints deleted too: only the copy kept elsewhere tells
    assert (report.status, report.position) == ("truncated", 20), report.summary()
    with pytest.raises(SignedNoteError):
        store = await open_event_store(f"sqlite://{path}")
        try:
            await verify(store, [SigningKey.generate("x").verifier], expected=note)
        finally:
            await store.close()


# -- JetStream: the server's API used against the log --------------------------------------------


async def test_jetstream_a_message_deleted_through_the_api_is_found(
    js_store: EventStore, key: SigningKey, nats_url: str
) -> None:
    await fill(js_store, 12)
    await checkpoint(js_store, key)
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().delete_msg(js_store.stream_name, 7)  # type: ignore[attr-defined]
    finally:
        await nc.close()
    report = await verify(js_store, [key.verifier])
    assert (report.status, report.position) == ("deleted", 7), report.summary()


async def test_jetstream_a_message_rewritten_as_delete_and_republish_is_found(
    js_store: EventStore, key: SigningKey, nats_url: str, prefix: str
) -> None:
    await fill(js_store, 12)
    await checkpoint(js_store, key)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        stream = js_store.stream_name  # type: ignore[attr-defined]
        original = await js.get_msg(stream, 4)
        await js.delete_msg(stream, 4)
        altered = original.data.replace(b'"n":3', b'"n":333')
        await js.publish(original.subject, altered)
    finally:
        await nc.close()
    report = await verify(js_store, [key.verifier])
    assert (report.status, report.position) == ("deleted", 4), report.summary()
