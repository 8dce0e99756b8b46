"""`fuse streams list|info` and `fuse events show`: what the log holds, stream by stream."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from newfuse.cli._common import Commands, open_store, positive_int
from newfuse.cli._output import event_json, print_json, print_pretty_json, print_table, rfc3339
from newfuse.errors import EventNotFoundError, StreamNotFoundError
from newfuse.eventstore import StreamInfo


def register(commands: Commands) -> None:
    """Add `fuse streams list`, `fuse streams info STREAM` and `fuse events show`."""
    streams = commands.add_parser("streams")
    actions = streams.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="every stream with its version, count and first/last position and time",
        description="Every stream of the log, by name (JSON Lines with --json).",
    )
    listing.add_argument("--category", help="only streams of this category")
    listing.set_defaults(handler=run_streams_list)
    info = actions.add_parser(
        "info",
        help="one stream: version, event count, first/last position and time",
        description="One stream's version, event count, first/last position and time.",
    )
    info.add_argument("stream", metavar="STREAM", help="<category>.<id>")
    info.set_defaults(handler=run_stream_info)

    events = commands.add_parser("events")
    event_actions = events.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = event_actions.add_parser(
        "show",
        help="one event, by id (or --position N)",
        description="Print one event whole: its envelope, payload and position.",
    )
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", metavar="ID", help="the event id")
    which.add_argument("--position", type=positive_int, metavar="N", help="the global position")
    show.set_defaults(handler=run_event_show)


def _info_json(info: StreamInfo) -> dict[str, Any]:
    return {
        "stream": info.stream,
        "version": info.version,
        "count": info.count,
        "first_position": info.first_position,
        "last_position": info.last_position,
        "first_timestamp": rfc3339(info.first_timestamp),
        "last_timestamp": rfc3339(info.last_timestamp),
    }


_INFO_HEADERS = [
    "STREAM",
    "VERSION",
    "COUNT",
    "FIRST POSITION",
    "LAST POSITION",
    "FIRST TIMESTAMP",
    "LAST TIMESTAMP",
]


def _info_row(info: StreamInfo) -> list[Any]:
    return [
        info.stream,
        info.version,
        info.count,
        info.first_position,
        info.last_position,
        info.first_timestamp,
        info.last_timestamp,
    ]


async def run_streams_list(args: argparse.Namespace) -> int:
    rows = []
    async with await open_store(args, create=False) as store:
        async for name in store.streams(category=args.category):
            info = await store.stream_info(name)
            if info is None:  # only invalid messages on its subject: nothing to show
                continue
            if args.json:
                print_json(_info_json(info))
            else:
                rows.append(_info_row(info))
    if not args.json:
        print_table(rows, _INFO_HEADERS)
    return 0


async def run_stream_info(args: argparse.Namespace) -> int:
    from newfuse.eventstore.jetstream import JetStreamEventStore  # loaded by the store anyway

    async with await open_store(args, create=False) as store:
        info = await store.stream_info(args.stream)
        # every event stream is a subject of one JetStream stream: its copies are theirs
        placement = await store.placement() if isinstance(store, JetStreamEventStore) else None
    if info is None:
        raise StreamNotFoundError(stream=args.stream)
    if args.json:
        found = _info_json(info)
        if placement is not None:
            found["jetstream"] = msgspec.to_builtins(placement)
        print_json(found)
        return 0
    print_table([_info_row(info)], _INFO_HEADERS)
    if placement is not None:
        where = f"cluster {placement.cluster}" if placement.cluster else "a single server"
        print(
            f"\nJetStream stream {placement.stream}: {placement.replicas} replica(s) on {where}, "
            f"leader {placement.leader or 'none (an election is under way)'}"
        )
        if placement.copies:
            print_table(
                [[copy.server, copy.state, copy.lag, copy.seen] for copy in placement.copies],
                ["SERVER", "STATE", "LAG", "LAST SEEN (S)"],
            )
    return 0


async def run_event_show(args: argparse.Namespace) -> int:
    async with await open_store(args, create=False) as store:
        if args.position is not None:
            event = await store.event_at(args.position)
            wanted = f"position {args.position}"
        else:
            event = await store.event(args.id)
            wanted = f"id {args.id!r}"
    if event is None:
        raise EventNotFoundError(wanted=wanted)
    if args.json:
        print_json(event_json(event))
    else:
        print_pretty_json(event_json(event))
    return 0
