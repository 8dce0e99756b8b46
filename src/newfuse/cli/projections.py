"""`fuse projections run|status|rebuild`, `fuse agents state` and `fuse audit`: the read side."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from newfuse.cli._common import (
    Progress,
    count_int,
    print_table,
    resolve_audit_db,
    resolve_redis_url,
    resolve_store_url,
    settings_from_args,
)
from newfuse.cli.events import parse_time
from newfuse.eventstore import EventStore, open_event_store
from newfuse.projections import (
    AgentStateView,
    AuditIndex,
    ProjectionGroup,
    RebuildProgress,
    prepared_status,
    rebuild,
)
from newfuse.projections.builtin import BUILTIN_NAMES, BuiltinProjections
from newfuse.projections.health import add_health_option, operations

_JSON = msgspec.json.Encoder()


def _print_json(value: Any) -> None:
    sys.stdout.write(_JSON.encode(value).decode() + "\n")


def register(commands: Any) -> None:
    projections = commands.add_parser("projections", help="run, inspect and rebuild projections")
    actions = projections.add_subparsers(dest="action", metavar="ACTION", required=True)

    run = actions.add_parser(
        "run",
        help="keep projections up to date until SIGTERM/Ctrl-C",
        description=f"Run projections (default: all built-in ones: {', '.join(BUILTIN_NAMES)}) "
        "as a long-lived process; SIGTERM stops each at a checkpoint.",
    )
    run.add_argument("names", nargs="*", metavar="NAME", help="projections to run")
    add_health_option(run)
    run.set_defaults(handler=run_projections)

    status = actions.add_parser("status", help="checkpoint, head, lag and dead letters")
    status.add_argument("names", nargs="*", metavar="NAME", help="projections (default: all)")
    status.add_argument("--json", action="store_true", help="a JSON list of objects")
    status.set_defaults(handler=run_status)

    rebuild_parser = actions.add_parser(
        "rebuild",
        help="replay history into a fresh copy, then swap it in atomically",
        description="Replay every event into a fresh namespace while the current one keeps "
        "serving, swap atomically, drop the old one. A progress bar shows on stderr.",
    )
    rebuild_parser.add_argument("name", metavar="NAME", help="the projection to rebuild")
    rebuild_parser.add_argument("--json", action="store_true", help="print the result as JSON")
    rebuild_parser.set_defaults(handler=run_rebuild)

    agents = commands.add_parser("agents", help="agent read models")
    agent_actions = agents.add_subparsers(dest="action", metavar="ACTION", required=True)
    state = agent_actions.add_parser("state", help="an agent's state (or every agent's)")
    state.add_argument("agent", nargs="?", help="agent id (default: all agents)")
    state.add_argument("--json", action="store_true", help="JSON output")
    state.set_defaults(handler=run_agent_state)

    audit = commands.add_parser(
        "audit",
        help="query the audit index: who did what, when, on whose behalf",
        description='Query the audit index (one row per event). `fuse audit sql "SELECT …"` '
        "runs raw SQL on a read-only connection.",
    )
    audit.add_argument("--agent", help="events by or about this agent")
    audit.add_argument("--type", help="event type")
    audit.add_argument("--stream", help="stream <category>.<id>")
    audit.add_argument("--correlation", help="correlation id")
    audit.add_argument("--since", help="ISO time, or relative: 30s, 10m, 2h, 7d")
    audit.add_argument("--until", help="ISO time, or relative: 30s, 10m, 2h, 7d")
    audit.add_argument("--limit", type=count_int, default=100, help="at most this many rows (100)")
    audit.add_argument("--newest-first", action="store_true", help="newest rows first")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.set_defaults(handler=run_audit)
    audit_actions = audit.add_subparsers(dest="action", metavar="ACTION", required=False)
    sql = audit_actions.add_parser("sql", help="run SQL on a read-only connection")
    sql.add_argument("statement", help='e.g. "SELECT type, count(*) FROM audit_events GROUP BY 1"')
    sql.add_argument("--json", action="store_true", help="one JSON object per row")
    sql.set_defaults(handler=run_audit_sql)


@asynccontextmanager
async def _opened(args: argparse.Namespace) -> AsyncIterator[tuple[EventStore, BuiltinProjections]]:
    settings = settings_from_args(args)
    store = await open_event_store(resolve_store_url(settings), prefix=settings.prefix)
    try:
        builtin = await BuiltinProjections.open(
            redis_url=resolve_redis_url(settings), audit_db=resolve_audit_db(settings)
        )
        try:
            yield store, builtin
        finally:
            await builtin.close()
    finally:
        await store.close()


async def run_projections(args: argparse.Namespace) -> int:
    async with _opened(args) as (store, builtin):
        runners = builtin.runners(store, args.names)
        print(
            f"fuse projections: running {', '.join(r.name for r in runners)}; SIGTERM to stop",
            file=sys.stderr,
        )
        group = ProjectionGroup(runners)
        async with operations(settings_from_args(args), store, runners, health=args.health):
            await group.run(handle_signals=True)
        for runner in runners:
            print(f"  {runner.name}: stopped at position {runner.checkpoint}", file=sys.stderr)
        failed = [runner for runner in runners if runner.failure is not None]
    return 1 if failed else 0


async def run_status(args: argparse.Namespace) -> int:
    async with _opened(args) as (store, builtin):
        statuses = []
        for name in args.names or builtin.names:
            projection, model = builtin.get(name)
            statuses.append(await prepared_status(projection, store, model))
    if args.json:
        _print_json(
            [
                {
                    "name": s.name,
                    "state": s.state,
                    "checkpoint": s.checkpoint,
                    "head": s.head,
                    "lag_events": s.lag_events,
                    "lag_seconds": s.lag_seconds,
                    "events_per_second": s.events_per_second,
                    "dead_letters": s.dead_letters,
                    "last_error": s.last_error,
                }
                for s in statuses
            ]
        )
        return 0
    print_table(
        [
            [
                s.name,
                s.state,
                s.checkpoint,
                s.head,
                s.lag_events,
                "" if s.lag_seconds is None else f"{s.lag_seconds:.3f}",
                f"{s.events_per_second:,.0f}",
                s.dead_letters,
                s.last_error or "",
            ]
            for s in statuses
        ],
        ["NAME", "STATE", "CHECKPOINT", "HEAD", "LAG", "LAG (S)", "EVENTS/S", "DEAD", "LAST ERROR"],
    )
    return 0


async def run_rebuild(args: argparse.Namespace) -> int:
    async with _opened(args) as (store, builtin):
        projection, model = builtin.get(args.name)
        progress = Progress(f"rebuild {args.name}", await store.head_position() or None)

        def report(step: RebuildProgress) -> None:
            progress.total = step.target or progress.total
            progress.advance(step.position - progress.done)

        result = await rebuild(projection, store, model, progress=report)
        progress.finish()
    if args.json:
        _print_json(result)
    else:
        print(
            f"rebuilt {result.projection}: generation {result.old_generation} -> "
            f"{result.new_generation}, {result.applied} events applied, checkpoint "
            f"{result.checkpoint}, {result.dead_letters} dead letter(s)"
        )
    return 0


async def run_agent_state(args: argparse.Namespace) -> int:
    async with _opened(args) as (_store, builtin):
        view = AgentStateView(builtin.redis)
        if args.agent:
            one = await view.get(args.agent)
            if one is None:
                print(f"fuse: no state recorded for agent {args.agent!r}", file=sys.stderr)
                return 1
            states = [one]
        else:
            states = await view.agents()
    if args.json:
        for state in states:
            _print_json(state)
        return 0
    print_table(
        [
            [
                s.agent_id,
                s.status or "",
                s.version,
                s.updated_at.isoformat() if s.updated_at else "",
                _JSON.encode(s.state).decode(),
            ]
            for s in states
        ],
        ["AGENT", "STATUS", "VERSION", "UPDATED AT", "STATE"],
    )
    return 0


async def run_audit(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    async with await AuditIndex.open(resolve_audit_db(settings)) as audit:
        records = await audit.query(
            agent=args.agent,
            type=args.type,
            stream=args.stream,
            correlation_id=args.correlation,
            since=parse_time(args.since, flag="--since") if args.since else None,
            until=parse_time(args.until, flag="--until") if args.until else None,
            limit=args.limit,
            newest_first=args.newest_first,
        )
    if args.json:
        for record in records:
            _print_json(record)
        return 0
    print_table(
        [
            [
                r.position,
                r.time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                r.stream,
                r.type,
                r.schema_version,
                r.sender or "",
                r.correlation_id or "",
                r.causation_id or "",
                r.trace_id or "",
            ]
            for r in records
        ],
        [
            "POSITION",
            "TIME (UTC)",
            "STREAM",
            "TYPE",
            "V",
            "SENDER",
            "CORRELATION",
            "CAUSATION",
            "TRACE",
        ],
    )
    print(f"{len(records)} row(s)", file=sys.stderr)
    return 0


async def run_audit_sql(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    async with await AuditIndex.open(resolve_audit_db(settings)) as audit:
        result = await audit.sql(args.statement)
    if args.json:
        for row in result.rows:
            _print_json(dict(zip(result.columns, row, strict=True)))
        return 0
    print_table([list(row) for row in result.rows], result.columns)
    return 0
