"""`fuse queues list`: each task queue's depth per priority, in-flight, workers, oldest waiting."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from newfuse.agents import QueueStats, queue_stats
from newfuse.cli._common import Commands, message_stream
from newfuse.cli._output import note, print_json, print_table, rfc3339


def register(commands: Commands) -> None:
    """Add `fuse queues list`."""
    queues = commands.add_parser("queues")
    actions = queues.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="each queue: depth per priority, in flight, workers, oldest waiting",
        description="Every task queue under the prefix (JSON Lines with --json): tasks waiting "
        "per priority, handed to a worker and not yet done, live workers (registry) and pull "
        "requests the queue's consumers hold, and when the oldest waiting task was stored. "
        "Reads only: it never creates a stream or a consumer.",
    )
    listing.set_defaults(handler=run_queues_list)


def queue_json(stats: QueueStats, now: datetime) -> dict[str, Any]:
    """A queue as `--json` prints it (depth keyed by priority, highest first)."""
    oldest = stats.oldest_waiting
    return {
        "queue": stats.queue,
        "depth": {str(p): stats.depth[p] for p in sorted(stats.depth, reverse=True)},
        "total": stats.total,
        "in_flight": stats.in_flight,
        "workers": stats.workers,
        "waiting_pulls": stats.waiting_pulls,
        "oldest_waiting": rfc3339(oldest),
        "oldest_priority": stats.oldest_priority,
        "oldest_age": None if oldest is None else round((now - oldest).total_seconds(), 3),
    }


def _depth(stats: QueueStats) -> str:
    shown = [f"{p}:{n}" for p, n in sorted(stats.depth.items(), reverse=True) if n]
    return " ".join(shown) or "-"


async def run_queues_list(args: argparse.Namespace) -> int:
    async with message_stream(args, name="fuse-queues") as (nc, prefix):
        found = await queue_stats(nc, prefix=prefix)
    now = datetime.now(UTC)
    if args.json:
        for stats in found:
            print_json(queue_json(stats, now))
        return 0
    rows = []
    for stats in found:
        oldest = stats.oldest_waiting
        age = (
            "-"
            if oldest is None
            else f"{(now - oldest).total_seconds():.1f}s (p{stats.oldest_priority})"
        )
        rows.append(
            [
                stats.queue,
                stats.total,
                _depth(stats),
                stats.in_flight,
                stats.workers,
                stats.waiting_pulls,
                age,
            ]
        )
    print_table(
        rows, ["QUEUE", "WAITING", "BY PRIORITY", "IN FLIGHT", "WORKERS", "PULLS", "OLDEST"]
    )
    note(f"{len(found)} queue(s)")
    return 0
