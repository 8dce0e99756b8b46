"""`fuse sagas list|show|resolve`: each saga as the seed's Transaction, from the
`transactions` projection when it is built, else folded from the log (each says which it
used), and a person's resolution of a stuck one."""

from __future__ import annotations

import argparse
import getpass
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from newfuse.cli._common import Commands, count_int, open_store, settings_from_args
from newfuse.cli._output import note, print_json, print_table, rfc3339
from newfuse.config import resolve_audit_db
from newfuse.core.orchestrator import CATEGORY, read_saga
from newfuse.core.resolution import resolve_saga
from newfuse.core.saga import SagaState
from newfuse.core.transactions import NAME, Progress, TransactionView, steps_json
from newfuse.errors import FuseError, ReadModelUnavailableError, SagaNotFoundError
from newfuse.eventstore import EventFilter, EventStore
from newfuse.schemas import utcnow

STATUSES = ("active", "compensating", "committed", "rolled_back", "stuck")
SOURCES = ("auto", "projection", "log")
_BEHIND_COUNTED = 10_000
"""Saga events after the projection's checkpoint counted at most (then: "10000 or more")."""


def register(commands: Commands) -> None:
    """Add `fuse sagas list`, `fuse sagas show ID` and `fuse sagas resolve ID`."""
    sagas = commands.add_parser("sagas")
    actions = sagas.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="every saga: its status and steps",
        description="Sagas oldest first, from the `transactions` projection when it is built "
        "(in the audit database: `fuse dev` or `fuse projections run` keeps it), else each "
        "`saga.<id>` stream folded; stderr says which, and how far behind the log the "
        "projection is. JSON Lines with --json: id, name, status, steps, started_at, ended_at.",
    )
    listing.add_argument("--status", choices=STATUSES, help="only sagas in this status")
    listing.add_argument(
        "--limit", type=count_int, default=100, help="the newest this many sagas (100)"
    )
    _add_source(listing)
    listing.set_defaults(handler=run_sagas_list)
    show = actions.add_parser(
        "show",
        help="one saga: each step's history, and its Transaction view",
        description="One saga: its status, each step with what happened to it, and the seed's "
        "Transaction {id, operations, status, timestamp}.",
    )
    show.add_argument("saga", metavar="ID", help="the saga's id")
    _add_source(show)
    show.set_defaults(handler=run_sagas_show)
    resolve = actions.add_parser(
        "resolve",
        help="resolve a stuck saga: undone by hand, or its compensation retried",
        description="A stuck saga's compensation kept failing. --rolled-back: you undid it by "
        "hand, the saga is rolled back; --retry: the compensation gets fresh attempts. "
        "Either is a saga.resolved event with who (--as, $FUSE_REVIEWER, the OS user), when "
        "and --comment.",
    )
    resolve.add_argument("saga", metavar="ID", help="the saga's id")
    how = resolve.add_mutually_exclusive_group(required=True)
    how.add_argument("--rolled-back", dest="resolution", action="store_const", const="rolled_back")
    how.add_argument("--retry", dest="resolution", action="store_const", const="retry")
    resolve.add_argument("--comment", required=True, help="what was done, or why retry")
    resolve.add_argument("--as", dest="reviewer", metavar="NAME", help="who resolves it")
    resolve.set_defaults(handler=run_sagas_resolve)


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="the projection, the log, or (auto) the projection when it is built",
    )


def saga_json(state: SagaState) -> dict[str, Any]:
    """A saga as `--json` prints it."""
    return {
        "id": state.id,
        "name": state.name,
        "status": state.status,
        "steps": steps_json(state),
        "started_at": rfc3339(state.started_at),
        "ended_at": rfc3339(state.ended_at),
        "failed_step": state.failed_step,
        "error": state.error,
    }


@asynccontextmanager
async def _projection(args: argparse.Namespace) -> AsyncIterator[TransactionView | None]:
    """The built `transactions` view (None: read the log), as `--source` asks.

    Raises:
        ReadModelUnavailableError: `--source projection` and there is none to read.
    """
    if args.source == "log":
        note("source: the log (--source log)")
        yield None
        return
    try:
        path = resolve_audit_db(settings_from_args(args))
        view = await TransactionView.open(path)
    except FuseError as error:  # no audit database configured, or no such file
        if args.source == "projection":
            raise
        note(f"source: the log (no transactions projection to read: {error})")
        yield None
        return
    async with view:
        if await view.progress() is None:
            if args.source == "projection":
                raise ReadModelUnavailableError(
                    model=f"sqlite {path}",
                    operation="read the transactions view",
                    reason=f"no {NAME!r} projection is built there; run `fuse projections run "
                    f"{NAME}` (or `fuse dev`)",
                )
            note(f"source: the log (no {NAME!r} projection built in {path})")
            yield None
            return
        yield view


async def _say_behind(store: EventStore, view: TransactionView, progress: Progress) -> None:
    """How far the projection is behind the log: saga events after its checkpoint."""
    behind, oldest = 0, None
    async for event in store.read_all(
        progress.checkpoint + 1, filter=EventFilter(categories=(CATEGORY,)), limit=_BEHIND_COUNTED
    ):
        behind += 1
        oldest = oldest or event.timestamp
    head = await store.head_position()
    counted = f"{behind}" if behind < _BEHIND_COUNTED else f"{_BEHIND_COUNTED} or more"
    lag = "up to date with the log" if not behind else f"{counted} saga event(s) behind the log"
    if oldest is not None:
        lag += f", the oldest {max((utcnow() - oldest).total_seconds(), 0.0):.1f}s ago"
    note(
        f"source: projection {NAME!r} in {view.path} (runner {progress.runner}), checkpoint "
        f"{progress.checkpoint} of head {head}: {lag}"
    )


async def _fold_all(store: EventStore) -> list[SagaState]:
    folds: dict[str, SagaState] = {}
    async for event in store.read_all(filter=EventFilter(categories=(CATEGORY,))):
        saga_id = event.stream.partition(".")[2]
        state = folds.get(saga_id)
        if state is None:
            state = folds[saga_id] = SagaState(saga_id)
        state.apply(event)
    return [s for s in folds.values() if s.name]


async def run_sagas_list(args: argparse.Namespace) -> int:
    async with await open_store(args, create=False) as store, _projection(args) as view:
        if view is not None:
            progress = await view.progress()
            assert progress is not None
            await _say_behind(store, view, progress)
            sagas = await view.sagas(status=args.status, limit=args.limit + 1)
        else:
            sagas = [s for s in await _fold_all(store) if args.status in (None, s.status)]
            sagas.sort(key=lambda s: (s.started_at or utcnow(), s.id))
            sagas = sagas[-(args.limit + 1) :]
    cut = len(sagas) > args.limit  # one more than the limit was read: it cut the listing
    if cut:
        sagas = sagas[1:]
    if args.json:
        for state in sagas:
            print_json(saga_json(state))
    else:
        print_table(
            [
                [
                    s.id,
                    s.name,
                    s.status,
                    f"{sum(1 for x in s.steps.values() if x.status == 'done')}/{len(s.steps)}",
                    s.started_at,
                    s.ended_at,
                    s.error or "",
                ]
                for s in sagas
            ],
            ["ID", "NAME", "STATUS", "DONE", "STARTED", "ENDED", "ERROR"],
        )
    if cut:
        note(f"{len(sagas)} saga(s) shown, the newest; --limit {args.limit} cut the listing")
    else:
        note(f"{len(sagas)} saga(s)")
    return 0


async def run_sagas_show(args: argparse.Namespace) -> int:
    async with await open_store(args, create=False) as store, _projection(args) as view:
        state = None
        if view is not None:
            progress = await view.progress()
            assert progress is not None
            await _say_behind(store, view, progress)
            state = await view.saga(args.saga)
            if state is None and args.source == "auto":
                note(f"saga {args.saga!r} is not in the projection (yet): folding its stream")
        if state is None and (view is None or args.source == "auto"):
            state = await read_saga(store, args.saga)
    if state is None or not state.name:
        raise SagaNotFoundError(saga_id=args.saga)
    if args.json:
        print_json(saga_json(state) | {"transaction": _transaction_json(state)})
        return 0
    print(f"saga {state.id} ({state.name}): {state.status}")
    if state.error:
        print(f"  failed at {state.failed_step}: {state.error}")
    print_table(
        [
            [step.name, step.group or "", step.status, step.attempts, "; ".join(step.history)]
            for step in state.steps.values()
        ],
        ["STEP", "GROUP", "STATUS", "ATTEMPTS", "HISTORY"],
    )
    for group, steps in _groups(state).items():
        print(f"group {group}: {', '.join(steps)} (run concurrently)")
    transaction = state.transaction()
    print(f"transaction {transaction.id}: {transaction.status} at {rfc3339(transaction.timestamp)}")
    for ignored in state.ignored:
        note(f"ignored: {ignored}")
    return 0


def _groups(state: SagaState) -> dict[str, list[str]]:
    """Each parallel group of the saga -> its steps, in their order."""
    groups: dict[str, list[str]] = {}
    for step in state.steps.values():
        if step.group is not None:
            groups.setdefault(step.group, []).append(step.name)
    return groups


def _transaction_json(state: SagaState) -> dict[str, Any]:
    transaction = state.transaction()
    return {
        "id": transaction.id,
        "operations": transaction.operations,
        "status": transaction.status,
        "timestamp": rfc3339(transaction.timestamp),
    }


async def run_sagas_resolve(args: argparse.Namespace) -> int:
    by = args.reviewer or os.environ.get("FUSE_REVIEWER") or getpass.getuser()
    async with await open_store(args, create=False) as store:
        state = await resolve_saga(store, args.saga, args.resolution, by=by, comment=args.comment)
    if args.json:
        print_json(saga_json(state))
        return 0
    print(f"saga {state.id} ({state.name}): {state.status}, resolved by {by} ({args.resolution})")
    return 0
