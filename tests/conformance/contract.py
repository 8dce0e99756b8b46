"""The EventStore contract as tests: every backend subclasses EventStoreContract unchanged.

A subclass provides one fixture, `open_store`: a factory opening a new store instance on the same
(empty, per-test) log, so that tests can use several instances at once as several processes would.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest

from newfuse.errors import (
    BatchTooLargeError,
    DuplicateEventError,
    InvalidNameError,
    InvalidPayloadError,
    SchemaError,
    StoreNotFoundError,
    UnknownTypeError,
    WrongExpectedVersionError,
)
from newfuse.eventstore import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    EventFilter,
    EventStore,
)
from newfuse.schemas import A2AMessage, A2AMetadata, NewEvent, RecordedEvent, StateUpdate
from support import wait_for


class StoreFactory(Protocol):
    """Opens another store instance on the test's log; options go to `open_event_store`."""

    def __call__(self, **options: Any) -> Awaitable[EventStore]: ...


def note(n: int, *, correlation_id: str | None = None) -> NewEvent:
    """An event of an unregistered type (stored and read back as raw JSON)."""
    return NewEvent(type="test.note", data={"n": n}, correlation_id=correlation_id)


def notes(*numbers: int) -> list[NewEvent]:
    return [note(n) for n in numbers]


async def collect(events: AsyncIterator[RecordedEvent]) -> list[RecordedEvent]:
    return [event async for event in events]


async def numbers(events: AsyncIterator[RecordedEvent]) -> list[int]:
    return [event.data["n"] async for event in events]


class EventStoreContract:
    """What every EventStore backend guarantees (DESIGN.md, "Event store contract")."""

    @pytest.fixture
    def open_store(self) -> StoreFactory:
        raise NotImplementedError("a backend's test class provides open_store")

    @pytest.fixture
    async def store(self, open_store: StoreFactory) -> EventStore:
        return await open_store()

    # -- expected versions -------------------------------------------------------------------------

    async def test_any_appends_to_a_new_and_to_an_existing_stream(self, store: EventStore) -> None:
        first = await store.append("agent.a1", notes(1), ANY)
        second = await store.append("agent.a1", notes(2, 3), ANY)
        assert (first.first_version, first.last_version) == (1, 1)
        assert (second.first_version, second.last_version) == (2, 3)
        assert second.first_position > first.last_position
        assert await numbers(store.read("agent.a1")) == [1, 2, 3]

    async def test_no_stream_succeeds_once_then_conflicts_naming_the_actual_version(
        self, store: EventStore
    ) -> None:
        await store.append("agent.a1", notes(1, 2), NO_STREAM)
        with pytest.raises(WrongExpectedVersionError, match=r"'agent\.a1'.*no-stream.*version 2"):
            await store.append("agent.a1", notes(3), NO_STREAM)
        assert await numbers(store.read("agent.a1")) == [1, 2]

    async def test_stream_exists_conflicts_on_an_empty_stream(self, store: EventStore) -> None:
        with pytest.raises(WrongExpectedVersionError) as caught:
            await store.append("agent.a1", notes(1), STREAM_EXISTS)
        assert (caught.value.stream, caught.value.actual) == ("agent.a1", 0)
        assert await store.stream_version("agent.a1") == 0
        await store.append("agent.a1", notes(1), ANY)
        result = await store.append("agent.a1", notes(2), STREAM_EXISTS)
        assert result.version == 2

    async def test_exact_version_conflict_names_stream_expected_actual_and_writes_nothing(
        self, store: EventStore
    ) -> None:
        await store.append("agent.a1", notes(1, 2, 3), NO_STREAM)
        head = await store.head_position()
        with pytest.raises(
            WrongExpectedVersionError, match=r"append to 'agent\.a1': expected version 1, .*3"
        ) as caught:
            await store.append("agent.a1", notes(4), 1)
        assert (caught.value.stream, caught.value.expected, caught.value.actual) == (
            "agent.a1",
            1,
            3,
        )
        assert await store.head_position() == head
        assert await numbers(store.read("agent.a1")) == [1, 2, 3]
        result = await store.append("agent.a1", notes(4), 3)
        assert result.version == 4

    async def test_expected_zero_means_the_stream_has_no_events(self, store: EventStore) -> None:
        await store.append("agent.a1", notes(1), 0)
        with pytest.raises(WrongExpectedVersionError):
            await store.append("agent.a1", notes(2), 0)

    async def test_a_conflicting_batch_writes_none_of_its_events(self, store: EventStore) -> None:
        await store.append("agent.a1", notes(1), NO_STREAM)
        with pytest.raises(WrongExpectedVersionError):
            await store.append("agent.a1", notes(2, 3, 4), 5)
        assert await numbers(store.read("agent.a1")) == [1]
        assert await store.stream_version("agent.a1") == 1

    # -- batches, positions, idempotency -----------------------------------------------------------

    async def test_a_batch_gets_consecutive_versions_and_increasing_positions(
        self, store: EventStore
    ) -> None:
        await store.append("agent.other", notes(0), ANY)
        result = await store.append("agent.a1", notes(*range(10)), NO_STREAM)
        assert (result.first_version, result.last_version) == (1, 10)
        events = await collect(store.read("agent.a1"))
        assert [e.version for e in events] == list(range(1, 11))
        positions = [e.position for e in events]
        assert positions == sorted(positions)
        assert positions[0] == result.first_position and positions[-1] == result.last_position
        assert [e.id for e in events] == list(result.ids)

    async def test_appending_the_same_event_ids_again_returns_the_first_result(
        self, store: EventStore
    ) -> None:
        batch = notes(1, 2, 3)
        first = await store.append("agent.a1", batch, NO_STREAM)
        again = await store.append("agent.a1", batch, NO_STREAM)
        assert again == first
        single = note(4)
        once = await store.append("agent.a1", single, 3)
        assert await store.append("agent.a1", single, 3) == once
        assert await store.append("agent.a1", single, ANY) == once
        assert await numbers(store.read("agent.a1")) == [1, 2, 3, 4]

    async def test_the_same_event_id_twice_in_one_batch_is_refused_naming_it_and_its_places(
        self, store: EventStore
    ) -> None:
        await store.append("agent.a1", note(1))
        twice, other = note(2), note(3)
        for expected in (ANY, 1):
            with pytest.raises(
                DuplicateEventError,
                match=rf"'agent\.a1': event id {twice.id} appears twice in one batch \(events 1 "
                r"and 3 of 3\); nothing was written",
            ):
                await store.append("agent.a1", [twice, other, twice], expected)
        with pytest.raises(DuplicateEventError, match=r"appears 3 times .*events 2, 3 and 4 of 4"):
            await store.append("agent.a2", [other, twice, twice, twice])
        assert await store.head_position() == 1
        assert await store.stream_version("agent.a2") == 0
        assert await numbers(store.read("agent.a1")) == [1]

    async def test_a_batch_larger_than_the_limit_is_refused_before_writing(
        self, store: EventStore
    ) -> None:
        with pytest.raises(BatchTooLargeError, match=r"'agent\.a1': 1001 events.*limit is 1000"):
            await store.append("agent.a1", [note(i) for i in range(1001)])
        assert await store.head_position() == 0

    # -- names and schemas -------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("name", "named"),
        [
            ("agent.a b", "a space"),
            ("agent.a*", "'*'"),
            ("agent.a>", "'>'"),
            ("agent.a.b", "a dot"),
            ("agent.a\tb", "U+0009"),
            ("agent.", "empty"),
            (".a1", "empty"),
            ("agenta1", "exactly one dot"),
        ],
    )
    async def test_stream_names_with_forbidden_characters_are_rejected_naming_them(
        self, store: EventStore, name: str, named: str
    ) -> None:
        with pytest.raises(InvalidNameError, match=re.escape(named)):
            await store.append(name, notes(1))
        assert await store.head_position() == 0

    async def test_registered_payloads_come_back_typed_and_unregistered_ones_as_json(
        self, store: EventStore
    ) -> None:
        update = StateUpdate(agent_id="a1", state={"mood": "busy"}, version=7)
        message = A2AMessage(
            type="task.request", payload={"q": 1}, metadata=A2AMetadata(sender="a2")
        )
        await store.append(
            "agent.a1",
            [
                NewEvent(data=update, correlation_id="c-1"),
                NewEvent(data=message, causation_id="e-0"),
                note(3),
            ],
        )
        events = await collect(store.read("agent.a1"))
        assert events[0].type == "agent.state_update" and events[0].data == update
        assert events[0].correlation_id == "c-1"
        assert events[1].type == "a2a.message" and events[1].data == message
        assert events[1].causation_id == "e-0"
        assert events[2].data == {"n": 3}

    async def test_an_invalid_payload_of_a_registered_type_names_the_field_and_writes_nothing(
        self, store: EventStore
    ) -> None:
        bad = NewEvent(type="agent.state_update", data={"agentId": "a1", "version": "seven"})
        with pytest.raises(InvalidPayloadError, match=r"agent\.state_update.*\$\.version"):
            await store.append("agent.a1", [note(1), bad])
        assert await store.head_position() == 0

    async def test_a_schema_version_below_one_is_refused_before_writing(
        self, store: EventStore
    ) -> None:
        with pytest.raises(SchemaError, match=r"schema version 0; schema versions count from 1"):
            await store.append("agent.a1", NewEvent(type="note", data={}, schema_version=0))
        assert await store.head_position() == 0

    async def test_bad_read_arguments_are_refused_naming_them(self, store: EventStore) -> None:
        with pytest.raises(ValueError, match=r"read_all: limit must be >= 0, got -1"):
            store.read_all(limit=-1)
        with pytest.raises(InvalidNameError, match=r"invalid category 'a\.b': it contains a dot"):
            EventFilter(categories=("a.b",))

    async def test_a_strict_category_rejects_unregistered_types(self, store: EventStore) -> None:
        store.registry.declare_strict("saga")
        with pytest.raises(UnknownTypeError, match=r"'test\.note'.*strict"):
            await store.append("saga.s1", notes(1))
        await store.append("agent.a1", notes(1))  # other categories stay open
        assert await store.stream_version("saga.s1") == 0

    # -- reading -----------------------------------------------------------------------------------

    async def test_read_forwards_from_a_version_with_a_limit(self, store: EventStore) -> None:
        await store.append("agent.a1", notes(*range(1, 11)))
        assert await numbers(store.read("agent.a1", from_version=4, limit=3)) == [4, 5, 6]
        assert await numbers(store.read("agent.a1", from_version=9)) == [9, 10]
        assert await numbers(store.read("agent.a1", from_version=11)) == []
        assert await numbers(store.read("agent.a1", limit=0)) == []
        assert await numbers(store.read("agent.nobody")) == []

    async def test_read_backwards_from_the_end_or_a_version(self, store: EventStore) -> None:
        await store.append("agent.a1", notes(*range(1, 11)))
        assert await numbers(store.read("agent.a1", backwards=True, limit=3)) == [10, 9, 8]
        assert await numbers(store.read("agent.a1", 5, backwards=True)) == [5, 4, 3, 2, 1]
        assert await numbers(store.read("agent.a1", 5, 2, backwards=True)) == [5, 4]
        assert await numbers(store.read("agent.a1", 1, backwards=True)) == [1]
        assert await numbers(store.read("agent.a1", 30, 2, backwards=True)) == [10, 9]

    async def test_read_all_from_a_position_in_global_order(self, store: EventStore) -> None:
        await store.append("agent.a1", notes(1))
        second = await store.append("agent.a2", notes(2))
        await store.append("agent.a1", notes(3))
        everything = await collect(store.read_all())
        assert [e.data["n"] for e in everything] == [1, 2, 3]
        assert [e.position for e in everything] == sorted(e.position for e in everything)
        assert await numbers(store.read_all(second.position)) == [2, 3]
        assert await numbers(store.read_all(second.position, limit=1)) == [2]

    async def test_read_all_filters_by_stream_category_type_and_correlation(
        self, store: EventStore
    ) -> None:
        await store.append("agent.a1", [note(1), NewEvent(type="test.other", data={"n": 2})])
        await store.append("saga.s1", NewEvent(type="test.note", data={"n": 3}, correlation_id="k"))
        await store.append(
            "agent.a2", NewEvent(type="test.note", data={"n": 4}, correlation_id="k")
        )

        async def matching(**fields: object) -> list[int]:
            return await numbers(store.read_all(filter=EventFilter(**fields)))  # type: ignore[arg-type]

        assert await matching(categories=("agent",)) == [1, 2, 4]
        assert await matching(streams=("agent.a1", "saga.s1")) == [1, 2, 3]
        assert await matching(types=("test.other",)) == [2]
        assert await matching(correlation_id="k") == [3, 4]
        assert await matching(categories=("agent",), correlation_id="k") == [4]
        assert await matching(categories=("nothing",)) == []

    async def test_read_all_since_and_until_a_time(self, store: EventStore) -> None:
        await store.append("agent.a1", notes(1, 2))
        middle = datetime.now(UTC)
        await wait_for(lambda: _later_than(middle))
        await store.append("agent.a1", notes(3, 4))
        assert await numbers(store.read_all(since=middle)) == [3, 4]
        assert await numbers(store.read_all(until=middle)) == [1, 2]
        future = datetime.now(UTC) + timedelta(hours=1)
        assert await numbers(store.read_all(since=future)) == []

    async def test_head_position_and_stream_version_follow_appends(self, store: EventStore) -> None:
        assert await store.head_position() == 0
        assert await store.stream_version("agent.a1") == 0
        result = await store.append("agent.a1", notes(1, 2))
        assert await store.head_position() == result.last_position
        assert await store.stream_version("agent.a1") == 2

    # -- subscribing -------------------------------------------------------------------------------

    async def test_subscribe_catches_up_then_follows_live_in_order(self, store: EventStore) -> None:
        await store.append("agent.a1", notes(1, 2, 3))
        seen: list[int] = []
        async with store.subscribe() as subscription:

            async def consume() -> None:
                async for event in subscription:
                    seen.append(event.data["n"])
                    if len(seen) == 6:
                        return

            consumer = asyncio.create_task(consume())
            await wait_for(lambda: _done(len(seen) == 3))
            await store.append("agent.a2", notes(4))
            await store.append("agent.a1", notes(5, 6))
            await asyncio.wait_for(consumer, 10)
        assert seen == [1, 2, 3, 4, 5, 6]

    async def test_subscribe_with_a_filter_from_a_position(self, store: EventStore) -> None:
        await store.append("agent.a1", notes(1))
        second = await store.append("saga.s1", notes(2))
        await store.append("agent.a1", notes(3))
        got: list[int] = []
        subscription = store.subscribe(EventFilter(categories=("agent",)), from_position=2)
        async with subscription:
            await store.append("saga.s1", notes(4))
            await store.append("agent.a1", notes(5))
            async for event in subscription:
                got.append(event.data["n"])
                if event.data["n"] == 5:
                    break
        assert second.position < 3
        assert got == [3, 5]

    async def test_closing_a_subscription_from_another_task_ends_its_waiting_consumer_quietly(
        self, store: EventStore
    ) -> None:
        await store.append("agent.a1", notes(1, 2))
        before = asyncio.all_tasks()
        subscription = store.subscribe()
        seen: list[int] = []

        async def consume() -> None:
            async with subscription:  # its own close on the way out is a no-op
                async for event in subscription:
                    seen.append(event.data["n"])

        consumer = asyncio.create_task(consume())
        await wait_for(lambda: _done(len(seen) == 2))  # caught up: now waiting for live events
        await subscription.close()  # from this task, while the consumer waits in its loop
        await asyncio.wait_for(consumer, 10)  # ends, and re-raises anything it raised
        assert seen == [1, 2]
        await subscription.close()  # idempotent
        # Nothing left running: no task of the subscription (nor of the consumer) stays behind.
        await wait_for(lambda: _done(not (asyncio.all_tasks() - before)))
        # The store is fine: a new subscription still sees everything.
        again: list[int] = []
        async with store.subscribe() as second:
            async for event in second:
                again.append(event.data["n"])
                if len(again) == 2:
                    break
        assert again == [1, 2]

    async def test_resubscribing_from_the_last_position_gives_no_gaps_and_no_duplicates(
        self, open_store: StoreFactory
    ) -> None:
        writer = await open_store()
        total = 300
        seen: list[RecordedEvent] = []
        last = 0

        async def produce() -> None:
            for start in range(0, total, 10):
                await writer.append(f"agent.a{start % 3}", notes(*range(start, start + 10)))

        producer = asyncio.create_task(produce())
        rng = random.Random(7)
        while len(seen) < total:
            reader = await open_store()  # a new subscriber, as after a process restart
            take = rng.randint(20, 80)
            async with reader.subscribe(from_position=last + 1) as subscription:
                async for event in subscription:
                    seen.append(event)
                    last = event.position
                    take -= 1
                    if take == 0 or len(seen) == total:
                        break
            await reader.close()
        await producer
        positions = [e.position for e in seen]
        assert positions == sorted(set(positions)), "duplicates or disorder"
        assert sorted(e.data["n"] for e in seen) == list(range(total)), "gaps"

    # -- concurrency -------------------------------------------------------------------------------

    async def test_eight_concurrent_appenders_exactly_one_wins_each_version(
        self, open_store: StoreFactory
    ) -> None:
        appenders = [await open_store() for _ in range(8)]
        per_appender = 15
        conflicts = 0

        async def run(index: int, store: EventStore) -> None:
            nonlocal conflicts
            for n in range(per_appender):
                while True:
                    version = await store.stream_version("agent.shared")
                    try:
                        await store.append("agent.shared", note(index * 100 + n), version)
                        break
                    except WrongExpectedVersionError as error:
                        assert error.actual > version
                        conflicts += 1

        await asyncio.gather(*(run(i, s) for i, s in enumerate(appenders)))
        events = await collect(appenders[0].read("agent.shared"))
        assert [e.version for e in events] == list(range(1, 8 * per_appender + 1))
        assert sorted(e.data["n"] for e in events) == sorted(
            i * 100 + n for i in range(8) for n in range(per_appender)
        )
        assert len({e.id for e in events}) == len(events)

    async def test_concurrent_any_appends_to_one_stream_all_land_without_holes(
        self, store: EventStore
    ) -> None:
        await asyncio.gather(*(store.append("agent.busy", notes(i)) for i in range(50)))
        events = await collect(store.read("agent.busy"))
        assert [e.version for e in events] == list(range(1, 51))
        assert sorted(e.data["n"] for e in events) == list(range(50))

    # -- looking up: streams, one stream, one event ------------------------------------------------

    async def test_streams_lists_the_streams_sorted_and_by_category(
        self, store: EventStore
    ) -> None:
        for stream in ("saga.s1", "agent.b", "agent.a", "agent.b"):
            await store.append(stream, notes(1))
        assert [name async for name in store.streams()] == ["agent.a", "agent.b", "saga.s1"]
        assert [name async for name in store.streams(category="agent")] == ["agent.a", "agent.b"]
        assert [name async for name in store.streams(category="none")] == []
        with pytest.raises(InvalidNameError):
            await anext(store.streams(category="a.b"))

    async def test_stream_info_gives_version_count_and_first_and_last_event(
        self, store: EventStore
    ) -> None:
        first = await store.append("agent.a1", notes(1, 2))
        await store.append("saga.other", notes(9))
        last = await store.append("agent.a1", notes(3))
        info = await store.stream_info("agent.a1")
        assert info is not None
        assert (info.stream, info.version, info.count) == ("agent.a1", 3, 3)
        assert (info.first_position, info.last_position) == (
            first.first_position,
            last.last_position,
        )
        events = await collect(store.read("agent.a1"))
        assert (info.first_timestamp, info.last_timestamp) == (
            events[0].timestamp,
            events[-1].timestamp,
        )
        assert await store.stream_info("agent.never") is None

    async def test_an_event_is_found_by_id_and_by_position(self, store: EventStore) -> None:
        await store.append("agent.a1", notes(1, 2))
        wanted = note(3)
        written = await store.append("saga.s1", wanted)
        found = await store.event(wanted.id)
        assert found is not None and (found.position, found.data) == (written.position, {"n": 3})
        at = await store.event_at(written.position)
        assert at is not None and at.id == wanted.id
        assert await store.event("01890000-0000-7000-8000-000000000000") is None  # a UUIDv7
        assert await store.event("not-a-uuid") is None
        assert await store.event_at(written.position + 1) is None
        assert await store.event_at(0) is None

    async def test_a_reader_that_may_not_create_finds_no_store_until_one_is_written(
        self, open_store: StoreFactory
    ) -> None:
        with pytest.raises(StoreNotFoundError, match=r"no event store at .*created by the first"):
            await open_store(create=False)
        writer = await open_store()
        await writer.append("agent.a1", notes(1))
        reader = await open_store(create=False)
        assert await numbers(reader.read_all()) == [1]


async def _later_than(moment: datetime) -> bool:
    return datetime.now(UTC) > moment + timedelta(milliseconds=5)


async def _done(condition: bool) -> bool:
    return condition
