"""`fuse agents run MODULE:AGENT` (one agent instance as a process, until SIGTERM/Ctrl-C),
`fuse agents list` (each agent type and version: instances, healthy/stale/down, last seen) and
`fuse agents dead-letters [show|replay ID]` (what agents gave up on, and sending it again)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import msgspec
from rich.markup import escape

from newfuse.agents import Agent, DeadLetters, StoredDeadLetter
from newfuse.agents.registry import Instance, live_at, read_liveness, runs, summarize
from newfuse.cli._common import (
    load_attribute,
    message_stream,
    nats_credentials,
    open_store,
    parse_time,
    resolve_nats_ca,
    resolve_nats_url,
    settings_from_args,
)
from newfuse.cli._output import cell, note, print_json, print_table, rfc3339, stdout_console
from newfuse.errors import ConfigError, DeadLetterReplayError, StoreNotFoundError
from newfuse.nats import Subjects, connect


def register_agent_actions(actions: Any) -> None:
    run = actions.add_parser(
        "run",
        help="run one instance of an agent until SIGTERM/Ctrl-C",
        description="Import MODULE, take its AGENT (an newfuse.agents.Agent) and run one "
        "instance on the NATS server; messages in flight at SIGTERM are redelivered.",
    )
    run.add_argument("agent", metavar="MODULE:AGENT", help="e.g. myapp.agents:geo")
    run.add_argument("--key", help="the instance's key (AgentId key; default: a random one)")
    run.add_argument("--no-fast-path", action="store_true", help="do not answer core NATS requests")
    run.set_defaults(handler=run_agent)
    listing = actions.add_parser(
        "list",
        help="each agent: id, name, version, instances, healthy/stale/down, last seen",
        description="Each agent type at each version with its instances, from their "
        "heartbeats: healthy (a heartbeat within 2 intervals), stale (within 5), down "
        "(stopped, or older). --at TIME: who was live then, from the log's registration "
        "events. JSON Lines with --json.",
    )
    listing.add_argument(
        "--at",
        metavar="TIME",
        help="who was live at this time (RFC 3339, e.g. 2026-12-03T05:00:00Z, or 10m ago)",
    )
    listing.add_argument(
        "--instances", action="store_true", help="one row per instance instead of per agent"
    )
    listing.set_defaults(handler=run_agents_list)

    letters = actions.add_parser(
        "dead-letters",
        help="messages agents gave up on; show one, or replay it",
        description="List the dead letters (oldest first; JSON Lines with --json), show one, "
        "or replay one: its message is sent again as a new message, once however often it is "
        "replayed.",
    )
    letters.add_argument("--agent", metavar="TYPE", help="only the dead letters of this type")
    letters.set_defaults(handler=run_dead_letters)
    letter_actions = letters.add_subparsers(dest="letter_action", metavar="ACTION")
    show = letter_actions.add_parser(
        "show",
        help="one dead letter and the message it gave up on",
        description="One dead letter (by id, or a unique start of it) and its message.",
    )
    show.add_argument("letter", metavar="ID", help="the dead letter's id (or its first digits)")
    show.set_defaults(handler=run_dead_letter_show)
    replay = letter_actions.add_parser(
        "replay",
        help="send a dead letter's message again",
        description="Send the message again, as a new message whose id is derived from the "
        "dead letter's (replaying twice sends once), to the subject it was delivered on (a "
        "topic's letter goes to its agent type's inbox).",
    )
    replay.add_argument("letter", metavar="ID", help="the dead letter's id (or its first digits)")
    replay.set_defaults(handler=run_dead_letter_replay)


def load_agent(spec: str) -> Agent:
    """The Agent named by `module:attribute`.

    Raises:
        ConfigError: it cannot be found, or is not an Agent.
    """
    found = load_attribute(spec, option="MODULE:AGENT", example="myapp.agents:geo")
    if not isinstance(found, Agent):
        raise ConfigError(
            variable="MODULE:AGENT",
            value=spec,
            reason=f"it is a {type(found).__name__}, not a newfuse.agents.Agent",
        )
    return found


async def run_agent(args: argparse.Namespace) -> int:
    agent = load_agent(args.agent)
    settings = settings_from_args(args)
    nc = await connect(
        resolve_nats_url(settings),
        name=f"fuse-agent-{agent.type}",
        credentials=nats_credentials(settings),
        ca=resolve_nats_ca(settings),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        running = agent.run(
            nc, key=args.key, prefix=settings.prefix, fast_path=not args.no_fast_path
        )
        async with running:
            print(
                f"fuse agents: {running.agent_id} handles "
                f"{', '.join(sorted(agent.routes)) or 'nothing'}; SIGTERM to stop",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()
        print(
            f"fuse agents: {running.agent_id} stopped after {running.handled} messages "
            f"({running.dead_lettered} dead letters)",
            file=sys.stderr,
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await nc.close()
    return 0


def _letter_json(stored: StoredDeadLetter) -> dict[str, Any]:
    letter = stored.letter
    return {
        "id": stored.id,
        "position": stored.position,
        "timestamp": rfc3339(stored.timestamp),
        "agent": stored.agent_type,
        "consumer": letter.consumer,
        "subject": letter.subject,
        "message_position": letter.position,
        "message_id": letter.message_id,
        "message_type": letter.message_type,
        "attempts": letter.attempts,
        "error": letter.error,
    }


async def run_dead_letters(args: argparse.Namespace) -> int:
    async with message_stream(args, name="fuse-dead-letters") as (nc, prefix):
        reader = DeadLetters(nc, prefix=prefix)
        letters = await reader.all(agent_type=args.agent)
    for skipped in reader.skipped:
        note(f"skipped: {skipped}")
    if args.json:
        for stored in letters:
            print_json(_letter_json(stored))
        return 0
    print_table(
        [
            [
                s.id,
                s.timestamp,
                s.letter.consumer,
                s.letter.message_type,
                s.letter.attempts,
                s.letter.error,
            ]
            for s in letters
        ],
        ["ID", "TIMESTAMP", "CONSUMER", "TYPE", "ATTEMPTS", "ERROR"],
    )
    note(f"{len(letters)} dead letter(s)")
    return 0


async def run_dead_letter_show(args: argparse.Namespace) -> int:
    async with message_stream(args, name="fuse-dead-letters") as (nc, prefix):
        reader = DeadLetters(nc, prefix=prefix)
        stored = await reader.get(args.letter)
        found: dict[str, Any] = _letter_json(stored)
        try:
            envelope, message = await reader.original(stored)
        except DeadLetterReplayError as error:
            found["message"], found["replayable"] = None, error.reason
        else:
            found["message"] = msgspec.to_builtins(message)
            found["replayable"] = None
            found["correlation_id"] = envelope.correlation_id
    if args.json:
        print_json(found)
        return 0
    console = stdout_console()
    for key, value in found.items():
        shown = msgspec.json.encode(value).decode() if key == "message" else value
        if key == "replayable":
            key, shown = "replay", "possible" if value is None else f"not possible: {value}"
        console.print(f"[bold]{key:>16}[/]  {escape(cell(shown))}", highlight=False)
    return 0


async def run_dead_letter_replay(args: argparse.Namespace) -> int:
    async with message_stream(args, name="fuse-dead-letters") as (nc, prefix):
        replayed = await DeadLetters(nc, prefix=prefix).replay(args.letter)
    if args.json:
        print_json(msgspec.to_builtins(replayed))
    elif replayed.already:
        note(
            f"dead letter {replayed.letter_id} was replayed already: message "
            f"{replayed.message_id} at position {replayed.position} on {replayed.subject} "
            f"(nothing sent)"
        )
    else:
        print(
            f"replayed dead letter {replayed.letter_id}: message {replayed.message_id} at "
            f"position {replayed.position} on {replayed.subject}"
        )
    return 0


def _instance_json(one: Instance) -> dict[str, Any]:
    return {
        "id": one.agent_type,
        "key": one.key,
        "instance": one.instance,
        "name": one.name,
        "version": one.version,
        "status": one.status,
        "started": rfc3339(one.started),
        "last_seen": rfc3339(one.last_seen),
    }


async def run_agents_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    at = None if args.at is None else parse_time(args.at, flag="--at")
    subjects = Subjects(settings.prefix)
    nc = await connect(
        resolve_nats_url(settings),
        name="fuse-agents-list",
        credentials=nats_credentials(settings),
        ca=resolve_nats_ca(settings),
    )
    try:
        try:
            instances = await read_liveness(nc, subjects, on_invalid=note)
        except StoreNotFoundError:
            instances = []
            if at is None:
                note(
                    f"no agent has run under prefix {settings.prefix!r} "
                    f"(no JetStream stream {subjects.liveness_stream_name})"
                )
        if at is not None:
            store = await open_store(args, create=False)
            try:
                history = await runs(store)
            finally:
                await store.close()
            instances = live_at(at, history, instances)
    finally:
        await nc.close()
    if args.instances:
        ordered = sorted(instances, key=lambda one: (one.agent_type, one.key, one.version))
        if args.json:
            for one in ordered:
                print_json(_instance_json(one))
            return 0
        print_table(
            [
                [f"{o.agent_type}/{o.key}", o.instance, o.name, o.version, o.status, o.last_seen]
                for o in ordered
            ],
            ["AGENT", "INSTANCE", "NAME", "VERSION", "STATUS", "LAST SEEN"],
        )
        return 0
    rows = summarize(instances)
    if args.json:
        for row in rows:
            print_json(
                {
                    "id": row.id,
                    "name": row.name,
                    "version": row.version,
                    "instances": row.instances,
                    "status": row.status,
                    "last_seen": rfc3339(row.last_seen),
                }
            )
        return 0
    print_table(
        [[r.id, r.name, r.version, r.instances, r.status, r.last_seen] for r in rows],
        ["ID", "NAME", "VERSION", "INSTANCES", "STATUS", "LAST SEEN"],
    )
    return 0
