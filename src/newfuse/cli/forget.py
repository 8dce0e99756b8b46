"""`fuse forget SUBJECT`: crypto-shredding. Deletes the data subject's key and records who did
it; every field sealed with that key reads as redacted from then on."""

from __future__ import annotations

import argparse
import getpass
import socket

from newfuse.cli._common import Commands, open_store
from newfuse.cli._output import note, print_json, print_table, rfc3339
from newfuse.security.forgetting import forget


def register(commands: Commands) -> None:
    """Add `fuse forget`."""
    parser = commands.add_parser(
        "forget",
        description="Delete a data subject's key (crypto-shredding): its personal and secret "
        "fields read as redacted in replays, `fuse events show` and read models rebuilt after "
        "it; the rest of each event stays readable. Appends `key.forgotten` (who, when, which "
        "subject; never the key) to the stream security.keys. With --json: subject, kid "
        "(null: no key was held), by, reason, event_id, position.",
    )
    parser.add_argument("subject", help="the data subject (the value of its DataSubject field)")
    parser.add_argument("--reason", help="why (a ticket, a request); recorded in the event")
    parser.add_argument(
        "--by", help="who asks (recorded; default: <OS user>@<host name>)", default=None
    )
    parser.set_defaults(handler=run_forget)


async def run_forget(args: argparse.Namespace) -> int:
    by = args.by or f"{getpass.getuser()}@{socket.gethostname()}"
    async with await open_store(args, create=False) as store:
        done = await forget(store, args.subject, by=by, reason=args.reason)
    event = done.event
    if args.json:
        print_json(
            {
                "subject": event.subject,
                "kid": event.kid,
                "by": event.by,
                "reason": event.reason,
                "timestamp": rfc3339(event.timestamp),
                "event_id": done.result.ids[0],
                "position": done.result.position,
            }
        )
        return 0
    print_table(
        [[event.subject, event.kid or "-", event.by, event.timestamp, done.result.position]],
        ["SUBJECT", "KEY DELETED", "BY", "AT", "EVENT POSITION"],
    )
    if event.kid is None:
        note(f"no key was held for {event.subject!r} (forgotten before, or nothing sealed)")
    note("read models built before keep what they held: rebuild them (fuse projections rebuild)")
    return 0
