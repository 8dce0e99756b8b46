"""`fuse agents history`: the conversation as the message stream stored it, turn by turn."""

from __future__ import annotations

import argparse
from typing import Any

from newfuse.agents.history import History, Turn
from newfuse.cli._common import message_keys, message_stream, positive_int
from newfuse.cli._output import StreamedTable, note, print_json, rfc3339


def register_history_action(actions: Any) -> None:
    history = actions.add_parser(
        "history",
        help="replay what agents said: requests, replies, topics, task states, dead letters",
        description="Every turn stored on the message stream, oldest first (a table, or JSON "
        "Lines with --json): of one conversation (--context), one agent type (as sender or "
        "addressee) or one task. Reads by direct get: nothing is consumed or written.",
    )
    history.add_argument("--context", metavar="ID", help="only this conversation (contextId)")
    history.add_argument("--agent", metavar="TYPE", help="only turns from or to this agent type")
    history.add_argument("--task", metavar="ID", help="only this task's turns")
    history.add_argument(
        "--from",
        dest="start",
        type=positive_int,
        default=1,
        metavar="POSITION",
        help="start at this position of the message stream",
    )
    history.add_argument("--limit", type=positive_int, metavar="N", help="print at most N turns")
    history.set_defaults(handler=run_history)


def turn_json(turn: Turn) -> dict[str, Any]:
    """A turn as the JSON Lines of `--json` (the field names of `Turn`)."""
    return {
        "position": turn.position,
        "time": rfc3339(turn.time),
        "kind": turn.kind,
        "sender": turn.sender,
        "to": turn.to,
        "type": turn.type,
        "id": turn.id,
        "context_id": turn.context_id,
        "task_id": turn.task_id,
        "text": turn.text,
        **({"redacted": list(turn.redacted)} if turn.redacted else {}),
    }


async def run_history(args: argparse.Namespace) -> int:
    async with (
        message_stream(args, name="fuse-history") as (nc, prefix),
        message_keys(nc, prefix) as cipher,
    ):
        history = History(nc, prefix=prefix, cipher=cipher)
        table = (
            None
            if args.json
            else StreamedTable(
                [
                    ("POS", 6),
                    ("TIME", 24),
                    ("KIND", 11),
                    ("FROM", 18),
                    ("TO", 22),
                    ("TYPE", 18),
                    ("TEXT", None),
                ]
            )
        )
        shown = 0
        async for turn in history.turns(
            context_id=args.context, agent=args.agent, task_id=args.task, start=args.start
        ):
            if table is None:
                print_json(turn_json(turn))
            else:
                table.row(
                    [
                        turn.position,
                        turn.time,
                        turn.kind,
                        turn.sender,
                        turn.to,
                        turn.type,
                        turn.text,
                    ]
                )
            shown += 1
            if args.limit is not None and shown >= args.limit:
                note(f"stopped at --limit {args.limit}")
                break
    for skipped in history.skipped:
        note(f"skipped: {skipped}")
    if table is not None:
        note(f"{shown} turn(s)")
    return 0
