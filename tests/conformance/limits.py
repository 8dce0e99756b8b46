"""The limits of the wire contract as contract tests: refused at once, not retryable, nothing
written, and nothing one caller does breaks the appends of the others (every backend)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import reduce
from typing import Any

import pytest
from contract import note

from newfuse.errors import (
    FuseError,
    InvalidEnvelopeError,
    InvalidNameError,
    NameTooLongError,
    NestingTooDeepError,
)
from newfuse.eventstore import EventStore
from newfuse.schemas import (
    MAX_CATEGORY_BYTES,
    MAX_EVENT_ID_BYTES,
    MAX_NESTING_DEPTH,
    MAX_STREAM_ID_BYTES,
    MAX_STREAM_NAME_BYTES,
    MAX_TYPE_NAME_BYTES,
    NewEvent,
    TraceContext,
)


def nested(depth: int) -> Any:
    """A value nesting `depth` levels of lists: nested(2) == [[]]."""
    return reduce(lambda inner, _: [inner], range(depth - 1), [])


# (stream, event) appends that break a limit, the error they must raise, and what it must say.
BAD: dict[str, tuple[Callable[[], tuple[str, NewEvent]], type[FuseError], str]] = {
    "stream id 5000 bytes": (
        lambda: ("agent." + "x" * 5000, note(1)),
        NameTooLongError,
        r"stream name 'agent\.xxx.*5006 bytes long .*limit is 160 \(MAX_STREAM_NAME_BYTES\)",
    ),
    "stream id over its limit": (
        lambda: ("a." + "x" * (MAX_STREAM_ID_BYTES + 1), note(1)),
        NameTooLongError,
        rf"stream id .*{MAX_STREAM_ID_BYTES + 1} bytes .*MAX_STREAM_ID_BYTES",
    ),
    "stream id over its limit in UTF-8 bytes": (
        lambda: ("a." + "é" * (MAX_STREAM_ID_BYTES // 2 + 1), note(1)),
        NameTooLongError,
        rf"stream id .*{MAX_STREAM_ID_BYTES + 2} bytes long \(UTF-8\)",
    ),
    "category over its limit": (
        lambda: ("c" * (MAX_CATEGORY_BYTES + 1) + ".x", note(1)),
        NameTooLongError,
        rf"stream category .*{MAX_CATEGORY_BYTES + 1} bytes .*MAX_CATEGORY_BYTES",
    ),
    "both tokens fit but not the whole": (
        lambda: ("c" * 40 + "." + "x" * MAX_STREAM_ID_BYTES, note(1)),
        NameTooLongError,
        rf"stream name .*{41 + MAX_STREAM_ID_BYTES} bytes .*MAX_STREAM_NAME_BYTES",
    ),
    "type over its limit": (
        lambda: ("agent.t", NewEvent(type="t" * (MAX_TYPE_NAME_BYTES + 1), data={})),
        NameTooLongError,
        rf"event type .*{MAX_TYPE_NAME_BYTES + 1} bytes .*MAX_TYPE_NAME_BYTES",
    ),
    "type of 5000 bytes": (
        lambda: ("agent.t", NewEvent(type="a." * 2500 + "b", data={})),
        NameTooLongError,
        r"event type .*5001 bytes",
    ),
    "event id over its limit": (
        lambda: ("agent.i", NewEvent(type="n", data={}, id="i" * (MAX_EVENT_ID_BYTES + 1))),
        NameTooLongError,
        rf"event id .*{MAX_EVENT_ID_BYTES + 1} bytes .*MAX_EVENT_ID_BYTES",
    ),
    "type with a non-ASCII character": (
        lambda: ("agent.t", NewEvent(type="café.noted", data={})),
        InvalidNameError,
        r"invalid event type 'café\.noted': .*non-ASCII character 'é' \(U\+00E9\)",
    ),
    "event id with a non-ASCII character": (
        lambda: ("agent.i", NewEvent(type="n", data={}, id="événement-1")),
        InvalidNameError,
        r"invalid event id 'événement-1': .*non-ASCII",
    ),
    "event id with CR LF": (
        lambda: ("agent.i", NewEvent(type="n", data={}, id="a\r\nPUB x 1\r\n")),
        InvalidNameError,
        r"invalid event id .*control or space character '\\r'",
    ),
    "traceparent with CR LF": (
        lambda: ("agent.tr", NewEvent(type="n", data={}, trace=TraceContext(traceparent="a\r\nb"))),
        InvalidEnvelopeError,
        r"\$\.trace\.traceparent: it holds control or non-ASCII",
    ),
    "tracestate of 5000 characters": (
        lambda: (
            "agent.tr",
            NewEvent(
                type="n",
                data={},
                trace=TraceContext(
                    traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01",
                    tracestate="k=" + "v" * 4998,
                ),
            ),
        ),
        InvalidEnvelopeError,
        r"\$\.trace\.tracestate: it is 5000 characters long, the limit is 1024",
    ),
    "data one level too deep": (
        lambda: ("agent.d", NewEvent(type="n", data=nested(MAX_NESTING_DEPTH + 1))),
        NestingTooDeepError,
        rf"'n' v1 at \$: it nests {MAX_NESTING_DEPTH + 1} levels of arrays/objects, the limit "
        rf"is {MAX_NESTING_DEPTH}",
    ),
    "data 5000 levels deep": (
        lambda: ("agent.d", NewEvent(type="n", data=nested(5000))),
        NestingTooDeepError,
        r"it nests arrays/objects deeper than the encoder can follow, the limit is 64",
    ),
}


class LimitsContract:
    """What every backend does with input past the limits of the wire contract."""

    @pytest.mark.parametrize("kind", list(BAD))
    async def test_an_append_past_a_limit_is_refused_at_once_not_retryable_writing_nothing(
        self, store: EventStore, kind: str
    ) -> None:
        make, error_type, message = BAD[kind]
        stream, event = make()
        await store.append("agent.before", note(0))
        head = await store.head_position()
        with pytest.raises(error_type, match=message) as caught:
            await asyncio.wait_for(store.append(stream, event), 2.0)
        assert not caught.value.retryable
        assert len(str(caught.value)) < 400, "a huge value is cut in the message"
        assert await store.head_position() == head
        assert (await store.append("agent.after", note(1))).version == 1

    @pytest.mark.parametrize("kind", list(BAD))
    async def test_one_bad_append_among_100_concurrent_good_ones_fails_alone(
        self, store: EventStore, kind: str
    ) -> None:
        make, error_type, _ = BAD[kind]
        stream, event = make()

        async def bad() -> None:
            with pytest.raises(error_type):
                await store.append(stream, event)

        good = [store.append(f"agent.g{n % 10}", note(n)) for n in range(100)]
        results = await asyncio.wait_for(asyncio.gather(*good[:50], bad(), *good[50:]), 30.0)
        assert len([r for r in results if r is not None]) == 100
        for n in range(10):
            assert await store.stream_version(f"agent.g{n}") == 10

    async def test_names_at_their_limits_are_stored_and_read_back(self, store: EventStore) -> None:
        category = "c" * MAX_CATEGORY_BYTES
        ident = "é" * ((MAX_STREAM_NAME_BYTES - MAX_CATEGORY_BYTES - 1) // 2)
        stream = f"{category}.{ident}"
        event = NewEvent(
            type="t." * (MAX_TYPE_NAME_BYTES // 2 - 1) + "tt",
            data=nested(MAX_NESTING_DEPTH),
            id="i" * MAX_EVENT_ID_BYTES,
        )
        result = await store.append(stream, event)
        [read] = [e async for e in store.read(stream)]
        assert (read.position, read.type, read.id) == (result.position, event.type, event.id)
        assert read.data == nested(MAX_NESTING_DEPTH)
        [replayed] = [e async for e in store.read_all(result.position)]
        assert replayed.stream == stream
