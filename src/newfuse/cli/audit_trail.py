"""`fuse audit keygen|checkpoint|verify|security`: the tamper-evident audit trail
(security/audit.py) and the security events (security/events.py), with the messages receiving
agents' policies denied (on each instance's own `agent.<type>-<key>` stream).

Keys live in `<state dir>/audit/` unless a path is given: `<name>.key` (the private key, owner
only) and `<name>.pub` (the verifier key, for anyone who checks). `verify` trusts every `.pub`
there and each `--trust FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import msgspec

from newfuse.cli._common import open_store, positive_int, settings_from_args
from newfuse.cli._output import note, print_json, print_table, progress, rfc3339
from newfuse.errors import KeyFileError
from newfuse.eventstore import EventFilter
from newfuse.schemas import (
    AuthFailed,
    IdentityCreated,
    IdentityRevoked,
    KeyForgotten,
    PermissionDenied,
    RecordedEvent,
)
from newfuse.security import SigningKey, VerifierKey, checkpoint, verify

DEFAULT_KEY = "newfuse-audit"
DENIED_TYPE = "permission.denied"


def add_actions(actions: Any) -> None:
    """Add keygen, checkpoint and verify to `fuse audit`'s actions."""
    keygen = actions.add_parser(
        "keygen",
        help="make the Ed25519 key that signs checkpoints",
        description="Write <dir>/<name>.key (private, mode 600, never overwritten) and "
        "<dir>/<name>.pub (give it to whoever verifies); prints the public key.",
    )
    keygen.add_argument("--name", default=DEFAULT_KEY, help=f"the key's name ({DEFAULT_KEY})")
    keygen.add_argument("--dir", type=Path, help="where to write (default: <state dir>/audit)")
    keygen.set_defaults(handler=run_keygen)
    cp = actions.add_parser(
        "checkpoint",
        help="sign the log's Merkle root as it is now",
        description="Grow the log's RFC 6962 tree from the key's last checkpoint to the head "
        "and append a signed checkpoint (stream audit.checkpoints). Prints the signed note: "
        "keep a copy elsewhere and pass it to `verify --expected`.",
    )
    cp.add_argument(
        "--key", type=Path, help=f"private key file (<state dir>/audit/{DEFAULT_KEY}.key)"
    )
    cp.add_argument(
        "--every", type=positive_int, metavar="SECONDS", help="repeat until interrupted"
    )
    cp.set_defaults(handler=run_checkpoint)
    check = actions.add_parser(
        "verify",
        help="recompute the log's tree and check it against the signed checkpoints",
        description="Recompute every leaf from position 1 and report the first position where "
        "history was changed, deleted, reordered or inserted, or how far it is verified and "
        "by which key. Exit status 0: verified; 1: history differs.",
    )
    check.add_argument(
        "--trust",
        type=Path,
        action="append",
        default=[],
        metavar="PUBFILE",
        help="a verifier key to trust (repeatable; default: <state dir>/audit/*.pub)",
    )
    check.add_argument(
        "--expected", type=Path, metavar="NOTEFILE", help="a checkpoint note kept elsewhere"
    )
    check.set_defaults(handler=run_verify)
    security = actions.add_parser(
        "security",
        help="what happened to who may do what: identities, denials, refused logins, keys",
        description="The events of the security category, oldest first: identity.created and "
        "identity.revoked (fuse auth), permission.denied (refusals the bus's own connections "
        "saw, and messages a receiving agent's policy denied), auth.failed (logins the server "
        "refused), key.forgotten (fuse forget). A table, or JSON Lines with --json.",
    )
    security.add_argument("--limit", type=positive_int, help="at most this many (the newest)")
    security.set_defaults(handler=run_security)


def _key_dir(args: argparse.Namespace) -> Path:
    return Path(settings_from_args(args).state_dir) / "audit"


async def run_keygen(args: argparse.Namespace) -> int:
    folder: Path = args.dir or _key_dir(args)
    key = SigningKey.generate(args.name)
    key.save(folder / f"{args.name}.key")
    (folder / f"{args.name}.pub").write_text(key.verifier.encode() + "\n")
    if args.json:
        print_json({"name": key.name, "public": key.verifier.encode(), "dir": str(folder)})
    else:
        print(key.verifier.encode())
        note(f"wrote {folder / args.name}.key (private, mode 600) and .pub")
    return 0


async def run_checkpoint(args: argparse.Namespace) -> int:
    key = SigningKey.load(args.key or _key_dir(args) / f"{DEFAULT_KEY}.key")
    async with await open_store(args, create=False) as store:
        while True:
            with progress("checkpoint", None) as meter:
                written = await checkpoint(store, key, progress=lambda n: _to(meter, n))
            for made in written.checkpoints:
                if args.json:
                    print_json(
                        {
                            "position": made.position,
                            "size": made.size,
                            "last_position": made.last_position,
                            "key": made.key.name,
                            "note": made.note,
                        }
                    )
                else:
                    print(made.note, end="", flush=True)
            if not written.checkpoints and not args.json:
                note(f"nothing new since the last checkpoint (head {written.head})")
            if args.every is None:
                return 0
            await asyncio.sleep(args.every)


def _to(meter: Any, n: int) -> None:
    meter.advance(n - meter.done)


def _trusted(args: argparse.Namespace) -> list[VerifierKey]:
    files: list[Path] = list(args.trust) or sorted(_key_dir(args).glob("*.pub"))
    if not files:
        raise KeyFileError(
            path=str(_key_dir(args)),
            reason="no verifier key to trust: pass --trust FILE, or run `fuse audit keygen`",
        )
    keys = []
    for path in files:
        try:
            text = path.read_text()
        except OSError as error:
            raise KeyFileError(path=str(path), reason=error.strerror or str(error)) from None
        keys.append(VerifierKey.decode(text, str(path)))
    return keys


async def run_verify(args: argparse.Namespace) -> int:
    keys = _trusted(args)
    expected = None
    if args.expected is not None:
        try:
            expected = args.expected.read_text()
        except OSError as error:
            raise KeyFileError(path=str(args.expected), reason=error.strerror or "") from None
    async with await open_store(args, create=False) as store:
        with progress("verify", await store.head_position()) as meter:
            report = await verify(store, keys, expected=expected, progress=lambda n: _to(meter, n))
    if args.json:
        print_json(
            {
                "status": report.status,
                "position": report.position,
                "detail": report.detail,
                "verified_to": report.verified_to,
                "key": report.key,
                "head": report.head,
                "records": report.records,
                "checkpoints": report.checkpoints,
                "ignored": report.ignored,
            }
        )
    else:
        rows: list[list[Any]] = [
            ["log", report.origin],
            ["records read", report.records],
            ["trusted checkpoints", report.checkpoints],
            ["verified up to", report.verified_to],
            ["head", report.head],
        ]
        print_table(rows, ["checked", "value"])
        for line in report.ignored:
            note(f"ignored checkpoint: {line}")
        (print if report.ok else _stderr)(report.summary())
    return 0 if report.ok else 1


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _what(data: Any) -> tuple[str, str]:
    """Who (the identity or subject concerned) and what, for the table."""
    if isinstance(data, IdentityCreated):
        agent = f" agent {data.agent}" if data.agent else ""
        groups = f" groups {','.join(data.groups)}" if data.groups else ""
        return data.name, f"{data.role}{agent}{groups} key {data.key[:12]}…"
    if isinstance(data, IdentityRevoked):
        return data.name, f"key {data.key[:12]}…"
    if isinstance(data, PermissionDenied):
        what = f"{data.operation} {data.message_type} on" if data.message_type else data.operation
        return data.identity, f"{what} {data.subject} ({data.count} time(s))"
    if isinstance(data, KeyForgotten):
        return data.subject, f"key {data.kid or '(none held)'}"
    if isinstance(data, AuthFailed):
        who = data.presented if len(data.presented) <= 16 else f"{data.presented[:12]}…"
        known = f" ({data.identity})" if data.identity else ""
        return f"{who}{known}", f"from {data.address}: {data.reason} ({data.count} time(s))"
    return "", ""


def _is_security(event: RecordedEvent) -> bool:
    """An event of the security category, or a denial a receiving agent stored on its own
    stream (an agent identity may write no security stream)."""
    return event.stream.startswith("security.") or event.type == DENIED_TYPE


async def run_security(args: argparse.Namespace) -> int:
    store = await open_store(args, create=False)
    where = EventFilter(categories=("security", "agent"))  # narrowed on the server
    async with store:
        events = [event async for event in store.read_all(filter=where) if _is_security(event)]
    if args.limit is not None:
        events = events[-args.limit :]
    if args.json:
        for event in events:
            print_json(
                {
                    "position": event.position,
                    "stream": event.stream,
                    "type": event.type,
                    "timestamp": rfc3339(event.timestamp),
                    "data": msgspec.to_builtins(event.data),
                }
            )
        return 0
    rows = []
    for event in events:
        who, what = _what(event.data)
        by = getattr(event.data, "by", None) or getattr(event.data, "seen_by", "")
        rows.append([event.position, rfc3339(event.timestamp), event.type, who, what, by])
    print_table(rows, ["position", "time", "type", "who", "what", "by"])
    return 0
