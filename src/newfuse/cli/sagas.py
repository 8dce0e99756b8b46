"""`fuse sagas list|show|resolve`: each saga as the seed's Transaction, folded from its stream,
and a person's resolution of a stuck one."""

from __future__ import annotations

import argparse
import getpass
import os
from typing import Any

from newfuse.cli._common import Commands, open_store
from newfuse.cli._output import note, print_json, print_table, rfc3339
from newfuse.core.orchestrator import CATEGORY, read_saga
from newfuse.core.resolution import resolve_saga
from newfuse.core.saga import SagaState
from newfuse.errors import SagaNotFoundError
from newfuse.eventstore import EventFilter

STATUSES = ("active", "compensating", "committed", "rolled_back", "stuck")


def register(commands: Commands) -> None:
    """Add `fuse sagas list`, `fuse sagas show ID` and `fuse sagas resolve ID`."""
    sagas = commands.add_parser("sagas")
    actions = sagas.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="every saga: its status and steps",
        description="Every saga in the event store (its `saga.<id>` stream folded), oldest "
        "first; JSON Lines with --json: id, name, status, steps, started_at, ended_at.",
    )
    listing.add_argument("--status", choices=STATUSES, help="only sagas in this status")
    listing.set_defaults(handler=run_sagas_list)
    show = actions.add_parser(
        "show",
        help="one saga: each step's history, and its Transaction view",
        description="One saga: its status, each step with what happened to it, and the seed's "
        "Transaction {id, operations, status, timestamp}.",
    )
    show.add_argument("saga", metavar="ID", help="the saga's id")
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


def saga_json(state: SagaState) -> dict[str, Any]:
    """A saga as `--json` prints it."""
    return {
        "id": state.id,
        "name": state.name,
        "status": state.status,
        "steps": [
            {
                "name": step.name,
                "group": step.group,
                "status": step.status,
                "phase": step.phase,
                "attempts": step.attempts,
                "output": step.output,
                "error": step.error,
                "history": step.history,
            }
            for step in state.steps.values()
        ],
        "started_at": rfc3339(state.started_at),
        "ended_at": rfc3339(state.ended_at),
        "failed_step": state.failed_step,
        "error": state.error,
    }


async def run_sagas_list(args: argparse.Namespace) -> int:
    async with await open_store(args, create=False) as store:
        folds: dict[str, SagaState] = {}
        async for event in store.read_all(filter=EventFilter(categories=(CATEGORY,))):
            saga_id = event.stream.partition(".")[2]
            state = folds.get(saga_id)
            if state is None:
                state = folds[saga_id] = SagaState(saga_id)
            state.apply(event)
    sagas = [s for s in folds.values() if s.name and args.status in (None, s.status)]
    if args.json:
        for state in sagas:
            print_json(saga_json(state))
        return 0
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
    note(f"{len(sagas)} saga(s)")
    return 0


async def run_sagas_show(args: argparse.Namespace) -> int:
    async with await open_store(args, create=False) as store:
        state = await read_saga(store, args.saga)
    if not state.name:
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
