"""RecordWriter: model records stored in the background, bounded, failures kept for settle()."""

from __future__ import annotations

import asyncio

import pytest

from newfuse.agents.models.recording import RecordWriter
from newfuse.errors import ModelRecordError, StoreUnavailableError


async def test_at_most_limit_records_are_in_flight_then_put_waits_for_room() -> None:
    release = asyncio.Event()
    stored: list[str] = []

    async def publish(subject: str, body: bytes, wire_headers: dict[str, str]) -> None:
        await release.wait()  # no PubAck until released
        stored.append(subject)

    writer = RecordWriter(publish, limit=2)
    first = [await writer.put(f"s.{n}", b"", {}, n) for n in range(2)]
    third = asyncio.create_task(writer.put("s.2", b"", {}, 2))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert writer.in_flight == 2 and not third.done()  # back-pressure: no room
    release.set()
    await writer.settle(first)
    await writer.settle([await third])
    await writer.flush()
    assert sorted(stored) == ["s.0", "s.1", "s.2"] and writer.in_flight == 0


async def test_a_record_not_stored_is_raised_by_settle_and_counted() -> None:
    async def publish(subject: str, body: bytes, wire_headers: dict[str, str]) -> None:
        raise StoreUnavailableError(operation=f"publish to {subject!r}", reason="on purpose")

    writer = RecordWriter(publish, limit=4)
    task = await writer.put("fuse.a2a._model.asker", b"", {}, 3)
    with pytest.raises(
        ModelRecordError,
        match=r"model call 3 was not stored on 'fuse\.a2a\._model\.asker'.*on purpose",
    ):
        await writer.settle([task])
    assert writer.failures == 1 and ModelRecordError.retryable
    await writer.flush()  # nothing in flight; a failure already settled is not raised again
