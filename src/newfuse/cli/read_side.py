"""`fuse projections run|status|rebuild`, `fuse agents state` and `fuse audit`: the read side."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from newfuse.cli._common import (
    Commands,
    count_int,
    open_store,
    optional_time,
    resolve_audit_db,
    resolve_redis_url,
    settings_from_args,
)
from newfuse.cli._output import note, print_error, print_json, print_table, progress, rfc3339
from newfuse.cli._read_models import ALL_NAMES, extra_projections
from newfuse.cli.agents import register_agent_actions
from newfuse.cli.history import register_history_action
from newfuse.cli.models import register_replay_action
from newfuse.eventstore import EventStore
from newfuse.projections import (
    AgentStateView,
    AuditIndex,
    ProjectionGroup,
    RebuildProgress,
    prepared_status,
    rebuild,
)
from newfuse.projections.agent_state import AgentState
from newfuse.projections.audit import DEFAULT_SQL_TIME_LIMIT, AuditRecord
from newfuse.projections.builtin import BuiltinProjections
from newfuse.projections.health import add_health_option, operations

_JSON = msgspec.json.Encoder()


def register(commands: Commands) -> None:
    """Add `fuse projections`, `fuse agents` and `fuse audit`."""
    projections = commands.add_parser("projections")
    actions = projections.add_subparsers(dest="action", metavar="ACTION", required=True)

    run = actions.add_parser(
        "run",
        help="keep projections up to date until SIGTERM/Ctrl-C",
        description=f"Run projections (default: all built-in ones: {', '.join(ALL_NAMES)}) "
        "as a long-lived process; SIGTERM stops each at a checkpoint.",
    )
    run.add_argument("names", nargs="*", metavar="NAME", help="projections to run")
    add_health_option(run)
    run.set_defaults(handler=run_projections)

    status = actions.add_parser("status", help="checkpoint, head, lag and dead letters")
    status.add_argument("names", nargs="*", metavar="NAME", help="projections (default: all)")
    status.set_defaults(handler=run_status)

    rebuild_parser = actions.add_parser(
        "rebuild",
        help="replay history into a fresh copy, then swap it in atomically",
        description="Replay every event into a fresh namespace while the current one keeps "
        "serving, swap atomically, drop the old one. A progress bar shows on stderr.",
    )
    rebuild_parser.add_argument("name", metavar="NAME", help="the projection to rebuild")
    rebuild_parser.set_defaults(handler=run_rebuild)

    agents = commands.add_parser("agents")
    agent_actions = agents.add_subparsers(dest="action", metavar="ACTION", required=True)
    state = agent_actions.add_parser("state", help="an agent's state (or every agent's)")
    state.add_argument("agent", nargs="?", help="agent id (default: all agents)")
    state.set_defaults(handler=run_agent_state)
    register_agent_actions(agent_actions)
    register_history_action(agent_actions)
    register_replay_action(agent_actions)

    audit = commands.add_parser(
        "audit",
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
    audit.set_defaults(handler=run_audit)
    audit_actions = audit.add_subparsers(dest="action", metavar="ACTION", required=False)
    sql = audit_actions.add_parser("sql", help="run SQL on a read-only connection")
    sql.add_argument("statement", help='e.g. "SELECT type, count(*) FROM audit_events GROUP BY 1"')
    sql.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_SQL_TIME_LIMIT,
        metavar="SECONDS",
        help=f"stop the query after this long (default {DEFAULT_SQL_TIME_LIMIT:g}; 0: no limit)",
    )
    sql.set_defaults(handler=run_audit_sql)
    from newfuse.cli import audit_trail  # keygen, checkpoint, verify: the tamper-evident trail

    audit_trail.add_actions(audit_actions)


@asynccontextmanager
async def _opened(
    args: argparse.Namespace, *, create: bool = False
) -> AsyncIterator[tuple[EventStore, BuiltinProjections]]:
    """The store and the built-in read models; only `projections run` may create the store."""
    settings = settings_from_args(args)
    store = await open_store(args, create=create)
    try:
        builtin = await BuiltinProjections.open(
            redis_url=resolve_redis_url(settings),
            audit_db=resolve_audit_db(settings),
            prefix=settings.prefix,
            extra=extra_projections(),
        )
        try:
            yield store, builtin
        finally:
            await builtin.close()
    finally:
        await store.close()


async def run_projections(args: argparse.Namespace) -> int:
    async with _opened(args, create=True) as (store, builtin):
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
        for s in statuses:
            print_json(
                {
                    "name": s.name,
                    "state": s.state,
                    "checkpoint": s.checkpoint,
                    "head": s.head,
                    "lag_events": s.lag_events,
                    "lag_seconds": s.lag_seconds,
                    "events_per_second": s.events_per_second,
                    "dead_letters": s.dead_letters,
                    "server": s.server,
                    "last_error": s.last_error,
                }
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
                s.server,
                s.last_error,
            ]
            for s in statuses
        ],
        [
            "NAME",
            "STATE",
            "CHECKPOINT",
            "HEAD",
            "LAG",
            "LAG (S)",
            "EVENTS/S",
            "DEAD",
            "SERVER",
            "LAST ERROR",
        ],
    )
    return 0


async def run_rebuild(args: argparse.Namespace) -> int:
    async with _opened(args) as (store, builtin):
        projection, model = builtin.get(args.name)
        with progress(f"rebuild {args.name}", await store.head_position() or None) as meter:

            def report(step: RebuildProgress) -> None:
                meter.set_total(step.target)
                meter.advance(step.position - meter.done)

            result = await rebuild(projection, store, model, progress=report)
    if args.json:
        print_json(result)
    else:
        print(
            f"rebuilt {result.projection}: generation {result.old_generation} -> "
            f"{result.new_generation}, {result.applied} events applied, checkpoint "
            f"{result.checkpoint}, {result.dead_letters} dead letter(s)"
        )
    return 0


def _agent_json(state: AgentState) -> dict[str, Any]:
    return {
        "agent_id": state.agent_id,
        "status": state.status,
        "status_at": rfc3339(state.status_at),
        "version": state.version,
        "updated_at": rfc3339(state.updated_at),
        "position": state.position,
        "state": state.state,
    }


async def run_agent_state(args: argparse.Namespace) -> int:
    async with _opened(args) as (_store, builtin):
        view = AgentStateView(builtin.redis)
        if args.agent:
            one = await view.get(args.agent)
            if one is None:
                print_error(f"no state recorded for agent {args.agent!r}")
                return 1
            states = [one]
        else:
            states = await view.agents()
    if args.json:
        for state in states:
            print_json(_agent_json(state))
        return 0
    print_table(
        [
            [s.agent_id, s.status, s.version, s.updated_at, _JSON.encode(s.state).decode()]
            for s in states
        ],
        ["AGENT", "STATUS", "VERSION", "UPDATED AT", "STATE"],
    )
    return 0


def _audit_json(record: AuditRecord) -> dict[str, Any]:
    """An audit row in the envelope's words (`id`, `timestamp`, `data`)."""
    return {
        "position": record.position,
        "id": record.event_id,
        "stream": record.stream,
        "category": record.category,
        "type": record.type,
        "schema_version": record.schema_version,
        "timestamp": rfc3339(record.time),
        "correlation_id": record.correlation_id,
        "causation_id": record.causation_id,
        "trace_id": record.trace_id,
        "sender": record.sender,
        "agent": record.agent,
        "data": record.payload,
    }


async def run_audit(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    async with await AuditIndex.open(resolve_audit_db(settings)) as audit:
        records = await audit.query(
            agent=args.agent,
            type=args.type,
            stream=args.stream,
            correlation_id=args.correlation,
            since=optional_time(args.since, flag="--since"),
            until=optional_time(args.until, flag="--until"),
            limit=args.limit + 1,  # one more tells whether the limit cut the listing
            newest_first=args.newest_first,
        )
    cut = len(records) > args.limit
    records = records[: args.limit]
    if args.json:
        for record in records:
            print_json(_audit_json(record))
    else:
        print_table(
            [
                [
                    r.position,
                    r.time,
                    r.stream,
                    r.type,
                    r.schema_version,
                    r.sender,
                    r.correlation_id,
                    r.causation_id,
                    r.trace_id,
                ]
                for r in records
            ],
            [
                "POSITION",
                "TIMESTAMP",
                "STREAM",
                "TYPE",
                "SCHEMA",
                "SENDER",
                "CORRELATION",
                "CAUSATION",
                "TRACE",
            ],
        )
    if cut:
        note(f"{len(records)} row(s) shown; --limit {args.limit} cut the listing: more rows match")
    elif not args.json:
        note(f"{len(records)} row(s)")
    return 0


def _seconds(text: str) -> float | None:
    """argparse type of --timeout: seconds > 0, or 0 for no limit."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds (e.g. 30 or 0.5), got {text!r}"
        ) from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value or None


def unique_columns(columns: Sequence[str]) -> list[str]:
    """Column names as JSON keys: a repeated name gets `:2`, `:3`… (SELECT 1 AS a, 2 AS a)."""
    seen: set[str] = set()
    unique = []
    for name in columns:
        candidate, number = name, 1
        while candidate in seen:
            number += 1
            candidate = f"{name}:{number}"
        seen.add(candidate)
        unique.append(candidate)
    return unique


async def run_audit_sql(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    async with await AuditIndex.open(resolve_audit_db(settings)) as audit:
        result = await audit.sql(args.statement, time_limit=args.timeout)
    if args.json:
        keys = unique_columns(result.columns)
        for row in result.rows:
            print_json(dict(zip(keys, row, strict=True)))
        return 0
    print_table(result.rows, result.columns)
    return 0
