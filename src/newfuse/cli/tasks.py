"""`fuse tasks list|show|reply`: A2A tasks as the fold of their events, and a human's answer."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from newfuse.agents import AgentClient, Task, Tasks
from newfuse.agents.tasks import TASK_STATES
from newfuse.cli._common import Commands, message_stream, read_data
from newfuse.cli._output import note, print_json, print_table, rfc3339, stdout_console
from newfuse.errors import ConfigError, TaskNotFoundError
from newfuse.schemas import check_depth


def register(commands: Commands) -> None:
    """Add `fuse tasks list`, `fuse tasks show ID` and `fuse tasks reply ID`."""
    tasks = commands.add_parser("tasks")
    actions = tasks.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="every task with its state, agent and counts",
        description="Every A2A task on the message stream, oldest first (JSON Lines with --json).",
    )
    listing.add_argument("--state", choices=TASK_STATES, help="only tasks in this state")
    listing.set_defaults(handler=run_tasks_list)
    show = actions.add_parser(
        "show",
        help="one task: state, status changes, messages, artifacts",
        description="One task as the fold of its events: its state, every status change, "
        "its messages and artifacts, and any event the fold ignored.",
    )
    show.add_argument("task", metavar="ID", help="the task id")
    show.set_defaults(handler=run_task_show)
    reply = actions.add_parser(
        "reply",
        help="answer an input-required task",
        description="Send the answer to the agent that asked: a user message with the task's "
        "ids and the type its question names. Refused unless the task is input-required.",
    )
    reply.add_argument("task", metavar="ID", help="the task id")
    reply.add_argument("text", metavar="TEXT", nargs="?", help="the answer as text")
    reply.add_argument(
        "--data", metavar="JSON", help="the answer as JSON ('-' for stdin, @PATH for a file)"
    )
    reply.add_argument(
        "--to-type",
        action="store_true",
        help="send to any instance of the asking agent's type, not to the instance that asked",
    )
    reply.add_argument("--sender", default="fuse-cli", help="who answers (default: fuse-cli)")
    reply.set_defaults(handler=run_task_reply)


def _text(parts: list[Any], payload: dict[str, Any] | None = None) -> str:
    if not parts and payload:
        return msgspec.json.encode(payload).decode()
    texts = [p.text for p in parts if p.text is not None]
    data = [msgspec.json.encode(p.data).decode() for p in parts if p.data is not None]
    urls = [p.url for p in parts if p.url is not None]
    return " ".join([*texts, *data, *urls])


def task_json(task: Task) -> dict[str, Any]:
    """A task as `--json` prints it: the fold with A2A field names inside messages."""
    return {
        "id": task.id,
        "context_id": task.context_id,
        "state": task.state,
        "agent": task.agent,
        "created": rfc3339(task.created),
        "updated": rfc3339(task.updated),
        "position": task.position,
        "statuses": [
            {
                "id": s.id,
                "state": s.state,
                "position": s.position,
                "timestamp": rfc3339(s.timestamp),
                "sender": s.sender,
                "message": msgspec.to_builtins(s.message),
            }
            for s in task.statuses
        ],
        "history": msgspec.to_builtins(task.history),
        "artifacts": msgspec.to_builtins(task.artifacts),
        "ignored": task.ignored,
    }


async def run_tasks_list(args: argparse.Namespace) -> int:
    async with message_stream(args, name="fuse-tasks") as (nc, prefix):
        reader = Tasks(nc, prefix=prefix)
        tasks = await reader.all(state=args.state)
    for skipped in reader.skipped:
        note(f"skipped: {skipped}")
    if args.json:
        for task in tasks:
            print_json(task_json(task))
        return 0
    print_table(
        [[t.id, t.state, t.agent, t.updated, len(t.history), len(t.artifacts)] for t in tasks],
        ["ID", "STATE", "AGENT", "UPDATED", "MESSAGES", "ARTIFACTS"],
    )
    note(f"{len(tasks)} task(s)")
    return 0


async def _one(args: argparse.Namespace) -> Task:
    async with message_stream(args, name="fuse-tasks") as (nc, prefix):
        reader = Tasks(nc, prefix=prefix)
        task = await reader.get(args.task)
    if task is None:
        raise TaskNotFoundError(task_id=args.task, subject=reader.subjects.task_events(args.task))
    return task


async def run_task_show(args: argparse.Namespace) -> int:
    task = await _one(args)
    if args.json:
        print_json(task_json(task))
        return 0
    console = stdout_console()
    for label, value in (
        ("task", task.id),
        ("context", task.context_id),
        ("state", task.state),
        ("agent", task.agent),
        ("created", rfc3339(task.created)),
        ("updated", rfc3339(task.updated)),
    ):
        console.print(f"[bold]{label:>8}[/]  {value or ''}", highlight=False)
    console.print()
    print_table(
        [[s.position, s.timestamp, s.state, s.sender] for s in task.statuses],
        ["POSITION", "TIMESTAMP", "STATE", "BY"],
    )
    console.print()
    print_table(
        [[m.role, m.metadata.sender, m.type, _text(m.parts, m.payload)] for m in task.history],
        ["ROLE", "SENDER", "TYPE", "TEXT"],
    )
    if task.artifacts:
        console.print()
        print_table(
            [[a.artifact_id, a.name, _text(a.parts)] for a in task.artifacts],
            ["ARTIFACT", "NAME", "CONTENT"],
        )
    for ignored in task.ignored:
        note(f"ignored: {ignored}")
    return 0


async def run_task_reply(args: argparse.Namespace) -> int:
    if args.text is None and args.data is None:
        raise ConfigError(
            variable="TEXT", value="", reason="give the answer as TEXT or --data JSON"
        )
    data: Any = None
    if args.data is not None:
        raw = read_data(args.data)
        check_depth(raw, "--data")
        try:
            data = msgspec.json.decode(raw)
        except msgspec.DecodeError as error:
            raise ConfigError(
                variable="--data", value=raw[:80].decode(errors="replace"), reason=str(error)
            ) from None
    async with (
        message_stream(args, name="fuse-tasks") as (nc, prefix),
        AgentClient(nc, prefix=prefix, sender=args.sender) as client,
    ):
        answer = await client.answer(args.task, text=args.text, data=data, to_type=args.to_type)
    if args.json:
        print_json(msgspec.to_builtins(answer))
    elif answer.duplicate:
        note(
            f"task {args.task} was answered already: message {answer.message_id} "
            f"at position {answer.position} (stored once)"
        )
    else:
        print(
            f"answered task {args.task}: message {answer.message_id} ({answer.message_type}) "
            f"to {answer.to}, position {answer.position}"
        )
    return 0
