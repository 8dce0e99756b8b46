"""`fuse publish`, `fuse replay` and `fuse tail`: write one event, read history, follow live."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from newfuse.cli._common import (
    Commands,
    count_int,
    open_store,
    optional_time,
    positive_int,
    read_data,
)
from newfuse.cli._output import (
    StreamedTable,
    event_json,
    note,
    print_json,
    print_table,
    progress,
)
from newfuse.errors import ConfigError
from newfuse.eventstore import EventFilter, EventStore, parse_expected
from newfuse.schemas import MAX_NESTING_DEPTH, NewEvent, RecordedEvent, nesting_depth


def register(commands: Commands) -> None:
    """Add `fuse publish`, `fuse replay` and `fuse tail`."""
    publish = commands.add_parser(
        "publish", description="Append one event. A version conflict exits with status 1."
    )
    publish.add_argument("stream", help="<category>.<id>, e.g. agent.researcher-1")
    publish.add_argument("type", help="event type, e.g. agent.state_update")
    publish.add_argument(
        "--data", required=True, help="the payload: JSON, '-' for standard input, or @FILE"
    )
    publish.add_argument(
        "--expected-version",
        default="any",
        help="a version number, 'any' (default), 'no-stream' or 'stream-exists'",
    )
    publish.add_argument(
        "--schema-version", type=positive_int, help="payload schema version (from 1)"
    )
    publish.add_argument("--correlation", help="correlation id")
    publish.add_argument("--causation", help="causation id")
    publish.set_defaults(handler=run_publish)

    replay = commands.add_parser(
        "replay",
        description="Print stored events that match the filters, oldest first, as a table (rows "
        "as they come) or JSON Lines; --follow goes on with new ones until Ctrl-C.",
    )
    _add_filters(replay)
    replay.add_argument(
        "--follow", "-f", action="store_true", help="after the stored events, follow new ones"
    )
    replay.set_defaults(handler=run_replay)
    tail = commands.add_parser(
        "tail", description="Follow new events that match the filters, until Ctrl-C."
    )
    _add_filters(tail)
    tail.set_defaults(handler=run_tail)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream", action="append", default=[], help="a stream (repeatable)")
    parser.add_argument("--category", action="append", default=[], help="a category (repeatable)")
    parser.add_argument("--type", action="append", default=[], help="an event type (repeatable)")
    parser.add_argument("--correlation", help="a correlation id")
    parser.add_argument(
        "--from-position", type=positive_int, default=None, help="first global position"
    )
    parser.add_argument("--since", help="ISO time, or relative: 30s, 10m, 2h, 7d")
    parser.add_argument("--until", help="ISO time, or relative: 30s, 10m, 2h, 7d")
    parser.add_argument("--limit", type=count_int, help="at most this many events")


def _filter(args: argparse.Namespace) -> EventFilter:
    return EventFilter(
        streams=tuple(args.stream),
        categories=tuple(args.category),
        types=tuple(args.type),
        correlation_id=args.correlation,
    )


async def run_publish(args: argparse.Namespace) -> int:
    text = read_data(args.data)
    shown = args.data if args.data == "-" or args.data.startswith("@") else text[:200]
    # Measured before decoding: msgspec decodes recursively and would raise RecursionError.
    depth = nesting_depth(text)
    if depth > MAX_NESTING_DEPTH:
        raise ConfigError(
            variable="--data",
            value=shown,
            reason=f"nests {depth} deep; event data may nest at most {MAX_NESTING_DEPTH} deep",
        )
    try:
        data = msgspec.json.decode(text)
    except msgspec.DecodeError as error:
        raise ConfigError(
            variable="--data", value=shown, reason=f"not valid JSON ({error})"
        ) from None
    try:
        expected = parse_expected(args.expected_version)
    except ValueError as error:
        raise ConfigError(
            variable="--expected-version", value=args.expected_version, reason=str(error)
        ) from None
    event = NewEvent(
        type=args.type,
        data=data,
        schema_version=args.schema_version,
        correlation_id=args.correlation,
        causation_id=args.causation,
    )
    async with await open_store(args, create=True) as store:
        result = await store.append(args.stream, event, expected)
    written = {
        "id": result.ids[0],
        "stream": result.stream,
        "version": result.version,
        "position": result.position,
    }
    if args.json:
        print_json(written)
    else:
        print_table([list(written.values())], ["ID", "STREAM", "VERSION", "POSITION"])
    return 0


_DATA_WIDTH = 120  # a table shows the start of a payload; --json gives all of it


def event_table(head: int) -> StreamedTable:
    """The streamed table of events; positions up to `head` fit their column."""
    return StreamedTable(
        [
            ("POSITION", max(len("POSITION"), len(str(head)))),
            ("TIMESTAMP", 27),
            ("STREAM", 24),
            ("VERSION", 7),
            ("TYPE", 22),
            ("CORRELATION", 14),
            ("DATA", None),
        ]
    )


def event_row(event: RecordedEvent) -> list[Any]:
    # The stored payload's start; a cut inside a UTF-8 sequence drops that character only.
    data = bytes(event.envelope.data)[: _DATA_WIDTH * 4].decode(errors="ignore")
    return [
        event.position,
        event.timestamp,
        event.stream,
        event.version,
        event.type,
        event.correlation_id,
        data,
    ]


async def run_replay(args: argparse.Namespace) -> int:
    if args.follow:
        return await _run_following(args, start_at_head=False)
    since = optional_time(args.since, flag="--since")
    until = optional_time(args.until, flag="--until")
    async with await open_store(args, create=False) as store:
        start = args.from_position or 1
        head = await store.head_position()
        total = max(head - start + 1, 0)
        if args.limit is not None:
            total = min(total, args.limit)
        table = None if args.json else event_table(head)
        # One more than the limit tells whether the limit cut the listing.
        limit = None if args.limit is None else args.limit + 1
        events = store.read_all(start, since=since, until=until, filter=_filter(args), limit=limit)
        count = 0
        cut = False
        with progress("replay", total or None) as meter:
            async for event in events:
                if count == args.limit:
                    cut = True
                    break
                count += 1
                meter.advance()
                if table is None:
                    print_json(event_json(event))
                else:
                    table.row(event_row(event))
    if cut:
        note(
            f"{count} event(s) shown; --limit {args.limit} cut the listing: more events match "
            f"(raise --limit, or continue with --from-position {event.position})"
        )
    elif table is not None:
        note(f"{count} event(s)")
    return 0


async def _follow(
    store: EventStore, args: argparse.Namespace, *, start_at_head: bool
) -> AsyncIterator[RecordedEvent]:
    until = optional_time(args.until, flag="--until")
    since = optional_time(args.since, flag="--since")
    # tail: new events only, unless asked to start earlier (at a position, or at a time: --since
    # replays what is stored from then, then follows live). replay --follow: from the start.
    if args.from_position:
        start = args.from_position
    elif since is not None or not start_at_head:
        start = 1
    else:
        start = await store.head_position() + 1
    seen = 0
    async with store.subscribe(_filter(args), from_position=start) as subscription:
        async for event in subscription:
            if since is not None and event.timestamp < since:
                continue
            if until is not None and event.timestamp > until:
                return
            yield event
            seen += 1
            if args.limit is not None and seen >= args.limit:
                return


async def _run_following(args: argparse.Namespace, *, start_at_head: bool) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    async with await open_store(args, create=False) as store:
        table = None if args.json else event_table(await store.head_position())
        try:
            async for event in _follow(store, args, start_at_head=start_at_head):
                if table is None:
                    print_json(event_json(event))
                else:
                    table.row(event_row(event))
                sys.stdout.flush()
        except asyncio.CancelledError:
            task.uncancel()
    return 0


async def run_tail(args: argparse.Namespace) -> int:
    return await _run_following(args, start_at_head=True)
