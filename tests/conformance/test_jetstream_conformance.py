"""The event store contract on the JetStream backend, plus what only a NATS server can show:
a plain nats-py publisher (the cross-language contract) and a server killed mid-subscription."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from contract import EventStoreContract, StoreFactory, note, notes
from limits import LimitsContract

from newfuse.eventstore import EventStore, InvalidEventReport, open_event_store
from newfuse.nats.embedded import NatsServer
from newfuse.schemas import RecordedEvent, StateUpdate
from support import wait_for


class TestJetStreamEventStore(EventStoreContract, LimitsContract):
    @pytest.fixture
    async def open_store(self, nats_url: str, prefix: str) -> AsyncIterator[StoreFactory]:
        opened: list[EventStore] = []

        async def factory(**options: Any) -> EventStore:
            store = await open_event_store(nats_url, prefix=prefix, **options)
            opened.append(store)
            return store

        yield factory
        for store in opened:
            await store.close()

    async def test_an_event_from_a_plain_nats_client_reads_back_typed(
        self, store: EventStore, nats_url: str, prefix: str
    ) -> None:
        # Only the documented wire contract: subject, headers, JSON body. No newfuse code.
        body = (
            b'{"id":"0192f0c1-7a1b-7c3d-8e4f-0123456789ab","stream":"agent.go-1",'
            b'"type":"agent.state_update","schema_version":1,"version":1,'
            b'"timestamp":"2026-11-24T12:00:00Z","correlation_id":"conv-9",'
            b'"data":{"agentId":"go-1","state":{"step":"plan"},"version":3,'
            b'"timestamp":"2026-11-24T12:00:00Z"}}'
        )
        nc = await nats.connect(nats_url)
        ack = await nc.jetstream().publish(
            f"{prefix}.ev.agent.go-1",
            body,
            headers={
                "Nats-Msg-Id": "0192f0c1-7a1b-7c3d-8e4f-0123456789ab",
                "Fuse-Type": "agent.state_update",
                "Fuse-Schema-Version": "1",
                "Fuse-Stream-Version": "1",
                "Nats-Expected-Last-Subject-Sequence": "0",
            },
        )
        await nc.close()
        [event] = [e async for e in store.read("agent.go-1")]
        assert event.position == ack.seq
        assert event.version == 1 and event.correlation_id == "conv-9"
        assert isinstance(event.data, StateUpdate)
        assert event.data.agent_id == "go-1" and event.data.state == {"step": "plan"}
        follow_up = await store.append("agent.go-1", note(2), 1)
        assert follow_up.version == 2

    async def test_a_message_that_is_not_an_envelope_is_reported_and_skipped(
        self, open_store: StoreFactory, nats_url: str, prefix: str
    ) -> None:
        store = await open_store()
        reports: list[InvalidEventReport] = []
        store.on_invalid = reports.append
        await store.append("agent.a1", notes(1))
        nc = await nats.connect(nats_url)
        bad = await nc.jetstream().publish(f"{prefix}.ev.agent.a1", b"not json at all")
        await nc.close()
        await store.append("agent.a2", notes(3))
        assert [e.data["n"] async for e in store.read_all()] == [1, 3]
        assert [r.position for r in reports] == [bad.seq]
        assert "invalid envelope" in reports[0].error

    @pytest.mark.faults
    async def test_subscription_survives_a_killed_and_restarted_server_without_gaps_or_duplicates(
        self, nats_server: NatsServer, prefix: str
    ) -> None:
        writer = await open_event_store(nats_server.url, prefix=prefix)
        reader = await open_event_store(nats_server.url, prefix=prefix)
        seen: list[RecordedEvent] = []
        try:
            await writer.append("agent.a1", notes(*range(50)))
            async with reader.subscribe() as subscription:

                async def consume() -> None:
                    async for event in subscription:
                        seen.append(event)
                        if len(seen) == 150:
                            return

                consumer = asyncio.create_task(consume())
                await wait_for(lambda: _true(len(seen) >= 50))
                await nats_server.kill()
                await nats_server.restart()
                await _append_retrying(writer, "agent.a1", range(50, 100))
                await nats_server.kill()
                await nats_server.restart()
                await _append_retrying(writer, "agent.a2", range(100, 150))
                await asyncio.wait_for(consumer, 30)
        finally:
            await writer.close()
            await reader.close()
        assert [e.data["n"] for e in seen] == list(range(150))
        positions = [e.position for e in seen]
        assert positions == sorted(set(positions))


async def _append_retrying(store: EventStore, stream: str, values: range) -> None:
    """Append after a restart: the client reconnects on its own; retry retryable errors."""
    for n in values:
        for _attempt in range(100):
            try:
                await store.append(stream, note(n))
                break
            except Exception as error:  # the store may still be reconnecting
                if not getattr(error, "retryable", False):
                    raise
                await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"append {n} to {stream} kept failing")


async def _true(condition: bool) -> bool:
    return condition
