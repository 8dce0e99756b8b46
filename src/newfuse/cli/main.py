"""The `fuse` entry point: global flags, subcommands, and errors turned into exit codes."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence

from newfuse.errors import FuseError

Handler = Callable[[argparse.Namespace], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuse", description="newfuse: an event-sourced agent-to-agent bus on NATS JetStream"
    )
    parser.add_argument("--nats", metavar="URL", help="NATS server URL (default: $FUSE_NATS_URL)")
    parser.add_argument("--redis", metavar="URL", help="Redis URL (default: $FUSE_REDIS_URL)")
    parser.add_argument(
        "--store", metavar="URL", help="event store URL, nats://… or sqlite:///… ($FUSE_STORE)"
    )
    parser.add_argument("--prefix", help="subject prefix (default: $FUSE_PREFIX or 'fuse')")
    parser.add_argument(
        "--audit-db", metavar="PATH", help="SQLite file of the read models ($FUSE_AUDIT_DB)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from newfuse.cli import dev, events, projections, schemas

    for module in (dev, events, schemas, projections):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `fuse` with `argv`; returns the exit status (errors go to stderr, status 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return run(handler(args))
    except FuseError as error:
        print(f"fuse: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run(coro: Awaitable[int]) -> int:
    """Run a coroutine on uvloop where available."""

    async def wrapper() -> int:
        return await coro

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(wrapper())
    return uvloop.run(wrapper())
