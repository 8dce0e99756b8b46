"""`fuse locks`: every named resource lock, its holder (saga, step, token, since) and waiters."""

from __future__ import annotations

import argparse
from typing import Any

from newfuse.cli._common import Commands, open_store
from newfuse.cli._output import note, print_json, print_table, rfc3339
from newfuse.core.locks import LockState, list_locks


def register(commands: Commands) -> None:
    """Add `fuse locks`."""
    parser = commands.add_parser(
        "locks",
        description="Every resource lock (a `lock.<resource>` stream folded): who holds it "
        "(saga, step, fencing token, since) and who waits; JSON Lines with --json: resource, "
        "holder, waiters, version.",
    )
    parser.add_argument("--held", action="store_true", help="only locks held or waited for")
    parser.set_defaults(handler=run_locks)


def lock_json(lock: LockState) -> dict[str, Any]:
    """A lock as `--json` prints it."""
    holder = lock.holder
    return {
        "resource": lock.resource,
        "holder": None
        if holder is None
        else {
            "saga": holder.saga_id,
            "step": holder.step,
            "token": holder.token,
            "since": rfc3339(holder.since),
        },
        "waiters": [
            {"saga": w.saga_id, "step": w.step, "since": rfc3339(w.since)}
            for w in lock.waiters.values()
        ],
        "version": lock.version,
    }


async def run_locks(args: argparse.Namespace) -> int:
    async with await open_store(args, create=False) as store:
        found = [lock async for lock in list_locks(store)]
    if args.held:
        found = [lock for lock in found if lock.holder is not None or lock.waiters]
    if args.json:
        for lock in found:
            print_json(lock_json(lock))
        return 0
    rows: list[list[Any]] = []
    for lock in found:
        holder = lock.holder
        rows.append(
            [
                lock.resource,
                "-" if holder is None else holder.saga_id,
                "" if holder is None else holder.step,
                "" if holder is None else holder.token,
                None if holder is None else holder.since,
                ", ".join(f"{w.saga_id} ({w.step})" for w in lock.waiters.values()),
            ]
        )
    print_table(rows, ["RESOURCE", "HOLDER", "STEP", "TOKEN", "SINCE", "WAITERS"])
    held = sum(1 for lock in found if lock.holder is not None)
    note(f"{len(found)} lock(s), {held} held")
    for lock in found:
        for ignored in lock.ignored:
            note(f"{lock.resource}: ignored: {ignored}")
    return 0
