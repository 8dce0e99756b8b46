"""`fuse publish`, `fuse replay` and `fuse tail`: write one event, read history, follow live."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from newfuse.cli._common import (
    Progress,
    count_int,
    positive_int,
    print_table,
    resolve_store_url,
    settings_from_args,
)
from newfuse.errors import ConfigError
from newfuse.eventstore import EventFilter, EventStore, open_event_store, parse_expected
from newfuse.schemas import NewEvent, RecordedEvent

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def register(commands: Any) -> None:
    publish = commands.add_parser(
        "publish",
        help="append one event to a stream",
        description="Append one event. A version conflict exits with status 1.",
    )
    publish.add_argument("stream", help="<category>.<id>, e.g. agent.researcher-1")
    publish.add_argument("type", help="event type, e.g. agent.state_update")
    publish.add_argument("--data", required=True, help="the payload as JSON")
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
    publish.add_argument("--json", action="store_true", help="print one JSON object")
    publish.set_defaults(handler=run_publish)

    for name, handler, text in (
        ("replay", run_replay, "print stored events that match the filters"),
        ("tail", run_tail, "follow new events that match the filters, until Ctrl-C"),
    ):
        parser = commands.add_parser(name, help=text, description=text)
        _add_filters(parser)
        parser.add_argument("--json", action="store_true", help="one JSON object per line")
        parser.set_defaults(handler=handler)


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


def parse_time(value: str, *, flag: str) -> datetime:
    """`2026-11-24T10:00:00Z`, `2026-11-24` or relative `10m` (ago) as an aware datetime."""
    match = _RELATIVE.match(value.strip())
    if match:
        delta = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        return datetime.now(UTC) - delta
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            variable=flag,
            value=value,
            reason="use an ISO time (2026-11-24T10:00:00Z) or a relative one (30s, 10m, 2h, 7d)",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _filter(args: argparse.Namespace) -> EventFilter:
    return EventFilter(
        streams=tuple(args.stream),
        categories=tuple(args.category),
        types=tuple(args.type),
        correlation_id=args.correlation,
    )


async def _open(args: argparse.Namespace) -> EventStore:
    settings = settings_from_args(args)
    return await open_event_store(resolve_store_url(settings), prefix=settings.prefix)


async def run_publish(args: argparse.Namespace) -> int:
    try:
        data = msgspec.json.decode(args.data)
    except msgspec.DecodeError as error:
        raise ConfigError(
            variable="--data", value=args.data, reason=f"not valid JSON ({error})"
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
    async with await _open(args) as store:
        result = await store.append(args.stream, event, expected)
    if args.json:
        sys.stdout.write(
            msgspec.json.encode(
                {
                    "stream": result.stream,
                    "version": result.version,
                    "position": result.position,
                    "id": result.ids[0],
                }
            ).decode()
            + "\n"
        )
    else:
        print_table(
            [[result.stream, result.version, result.position, result.ids[0]]],
            ["STREAM", "VERSION", "POSITION", "ID"],
        )
    return 0


def _row(event: RecordedEvent) -> list[Any]:
    data = msgspec.json.encode(event.data).decode()
    return [
        event.position,
        event.timestamp.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        event.stream,
        event.version,
        event.type,
        event.correlation_id or "",
        data if len(data) <= 80 else data[:79] + "…",
    ]


_HEADERS = ["POSITION", "TIME (UTC)", "STREAM", "VERSION", "TYPE", "CORRELATION", "DATA"]


def _json_line(event: RecordedEvent) -> str:
    return msgspec.json.encode(event.to_wire()).decode() + "\n"


async def run_replay(args: argparse.Namespace) -> int:
    since = parse_time(args.since, flag="--since") if args.since else None
    until = parse_time(args.until, flag="--until") if args.until else None
    async with await _open(args) as store:
        start = args.from_position or 1
        head = await store.head_position()
        total = max(head - start + 1, 0)
        if args.limit is not None:
            total = min(total, args.limit)
        progress = Progress("replay", total or None)
        events = store.read_all(
            start, since=since, until=until, filter=_filter(args), limit=args.limit
        )
        rows: list[list[Any]] = []
        count = 0
        async for event in events:
            count += 1
            progress.advance()
            if args.json:
                sys.stdout.write(_json_line(event))
            else:
                rows.append(_row(event))
        progress.finish()
    if not args.json:
        print_table(rows, _HEADERS)
        print(f"{count} event(s)", file=sys.stderr)
    return 0


async def _follow(store: EventStore, args: argparse.Namespace) -> AsyncIterator[RecordedEvent]:
    until = parse_time(args.until, flag="--until") if args.until else None
    since = parse_time(args.since, flag="--since") if args.since else None
    # New events only, unless asked to start earlier: at a position, or at a time (--since
    # replays what is stored from then, then follows live).
    start = args.from_position or (1 if since else await store.head_position() + 1)
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


async def run_tail(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    async with await _open(args) as store:
        if not args.json:
            print("  ".join(_HEADERS), file=sys.stderr)
        try:
            async for event in _follow(store, args):
                if args.json:
                    sys.stdout.write(_json_line(event))
                else:
                    sys.stdout.write("  ".join(str(cell) for cell in _row(event)) + "\n")
                sys.stdout.flush()
        except asyncio.CancelledError:
            task.uncancel()
    return 0
