"""`fuse auth add|list|revoke|sync|config`: identities (nkeys) and the nats-server authorization
that enforces their permissions (security/identities.py).

A `system` identity (`--role system`) is a user of the server's system account, where the
server reports the logins it refused: a secure `fuse dev` makes one and records those refusals
as `auth.failed` (security/auth_events.py).

Identities live in `<state dir>/auth/` (or `--dir`): `identities.json` and one credentials file
per identity (`<name>.creds`, owner-only), which `--credentials` / FUSE_NATS_CREDENTIALS point
at. With a `fuse dev --secure` running, `add` and `revoke` also rewrite its server's
authorization and make it reload (SIGHUP), and `add` makes a new agent's consumers; both
record the change in its log (`identity.created` / `identity.revoked` on security.identities,
security/events.py). Without one, `fuse auth sync` records what the log does not hold yet.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from newfuse._files import write_private  # owner-only: it lists every public key
from newfuse.cli._common import Commands, open_store, settings_from_args
from newfuse.cli._output import note, print_json, print_table
from newfuse.config import Settings, read_dev_state, resolve_nats_ca
from newfuse.nats import Subjects
from newfuse.schemas import IDENTITIES_STREAM
from newfuse.security.events import sync_identities
from newfuse.security.identities import ROLES, Identity, IdentityStore, Role, server_config

DEV_SERVER_NAME = "newfuse-embedded"
"""The name `fuse dev`'s nats-server has (NatsServer's default)."""
AUTH_CONFIG = "auth.conf"
"""The file a secure `fuse dev` gives nats-server (`--config`), in its data directory."""


def register(commands: Commands) -> None:
    """Add `fuse auth` and its actions."""
    auth = commands.add_parser(
        "auth",
        description="Identities (NATS nkeys: the server checks a signature, never sees the "
        "seed) and the permissions nats-server enforces for each role. JSON Lines with --json.",
    )
    auth.add_argument("--dir", type=Path, help="where identities live (<state dir>/auth)")
    actions = auth.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create an identity and its credentials file")
    add.add_argument("name", help="letters, digits, '-' and '_'")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument(
        "--agent",
        default="",
        metavar="TYPE/KEY",
        help="the agent (role agent); type task-QUEUE: a worker of task queue QUEUE",
    )
    add.add_argument(
        "--send-to", action="append", default=[], metavar="TYPE", help="inboxes it may write to"
    )
    add.add_argument("--topic", action="append", default=[], help="topics it subscribes to")
    add.add_argument(
        "--publish-topic", action="append", default=[], metavar="TOPIC", help="topics it writes"
    )
    add.add_argument(
        "--group",
        action="append",
        default=[],
        help="a review group it decides for (repeatable; roles reviewer and admin)",
    )
    add.add_argument("--as", dest="by", help="who makes it, in the log (default: user@host)")
    add.set_defaults(handler=run_add)
    listing = actions.add_parser("list", help="every identity: role, public key, permissions")
    listing.set_defaults(handler=run_list)
    revoke = actions.add_parser("revoke", help="revoke an identity (its credentials deleted)")
    revoke.add_argument("name")
    revoke.add_argument("--as", dest="by", help="who revokes it, in the log (default: user@host)")
    revoke.set_defaults(handler=run_revoke)
    sync = actions.add_parser(
        "sync",
        help="record in the log the identities it does not hold yet",
        description="Append identity.created / identity.revoked (stream security.identities) "
        "for each identity made or revoked while the bus was not reachable; idempotent.",
    )
    sync.add_argument("--as", dest="by", help="who records them (default: user@host)")
    sync.set_defaults(handler=run_sync)
    config = actions.add_parser(
        "config", help="print the nats-server configuration: users, the system account"
    )
    config.add_argument("--out", type=Path, help="write it to this file instead")
    config.set_defaults(handler=run_config)


def identity_store(args: argparse.Namespace) -> IdentityStore:
    folder: Path | None = getattr(args, "dir", None)
    return IdentityStore(folder or Path(settings_from_args(args).state_dir) / "auth")


def identity_json(identity: Identity, store: IdentityStore) -> dict[str, Any]:
    return {
        "name": identity.name,
        "role": identity.role,
        "public_key": identity.public_key,
        "agent": f"{identity.agent_type}/{identity.agent_key}" if identity.agent_type else None,
        "send_to": list(identity.send_to),
        "topics": list(identity.topics),
        "publish_topics": list(identity.publish_topics),
        "groups": list(identity.groups),
        "created": identity.created,
        "revoked": identity.revoked,
        "credentials": None if identity.revoked else str(store.seed_file(identity.name)),
    }


async def run_add(args: argparse.Namespace) -> int:
    store = identity_store(args)
    ca = resolve_nats_ca(settings_from_args(args))  # a TLS bus: its credentials carry the CA
    identity = store.add(
        args.name,
        args.role,
        agent=args.agent,
        send_to=args.send_to,
        publish_topics=args.publish_topic,
        topics=args.topic,
        groups=args.group,
        ca=ca or "",
    )
    if args.json:
        print_json(identity_json(identity, store))
    else:
        print(f"{identity.name}  {identity.role}  {identity.public_key}")
        note(f"credentials: {store.seed_file(identity.name)} (mode 600; never logged)")
    await _reload_dev(args, store, [identity])
    await _record(args, store)
    return 0


async def run_list(args: argparse.Namespace) -> int:
    store = identity_store(args)
    rows = [identity_json(identity, store) for identity in store.list()]
    if args.json:
        for row in rows:
            print_json(row)
        return 0
    print_table(
        [
            [
                r["name"],
                r["role"],
                r["agent"] or "",
                ",".join(r["send_to"]),
                r["public_key"][:12] + "…",
                "revoked " + r["revoked"][:19] if r["revoked"] else "active",
            ]
            for r in rows
        ],
        ["identity", "role", "agent", "may send to", "public key", "status"],
    )
    return 0


async def run_revoke(args: argparse.Namespace) -> int:
    store = identity_store(args)
    revoked = store.revoke(args.name)
    if args.json:
        print_json(identity_json(revoked, store))
    else:
        print(f"{revoked.name} revoked at {revoked.revoked}")
    await _reload_dev(args, store, [])
    await _record(args, store)
    return 0


async def run_sync(args: argparse.Namespace) -> int:
    store = identity_store(args)
    events = await open_store(args, create=True)
    async with events:
        appended = await sync_identities(events, store.list(), by=_by(args))
    if args.json:
        print_json({"appended": appended})
    else:
        print(f"{appended} identity event(s) appended to {IDENTITIES_STREAM}")
    return 0


def _by(args: argparse.Namespace) -> str:
    return getattr(args, "by", None) or f"{getpass.getuser()}@{socket.gethostname()}"


async def _record(args: argparse.Namespace, store: IdentityStore) -> None:
    """Record the change in the log of the `fuse dev --secure` on these identities, if one
    runs; otherwise say how it gets there."""
    settings = settings_from_args(args)
    state = read_dev_state(settings)
    if (
        state is None
        or state.credentials is None
        or Path(state.credentials).parent != (store.directory)
    ):
        note(f"not in the log yet: `fuse auth sync` records it ({IDENTITIES_STREAM})")
        return
    from newfuse.eventstore import open_event_store
    from newfuse.nats.connection import Credentials

    events = await open_event_store(
        state.nats_url,
        prefix=settings.prefix,
        credentials=Credentials.load(state.credentials),
        ca=state.ca,
    )
    async with events:
        appended = await sync_identities(events, store.list(), by=_by(args))
    note(f"recorded in {IDENTITIES_STREAM} ({appended} event(s))")


async def run_config(args: argparse.Namespace) -> int:
    store = identity_store(args)
    text = server_config(store.list(), Subjects(settings_from_args(args).prefix))
    if args.out is None:
        print(text, end="")
    else:
        write_private(args.out, text)
        note(f"wrote {args.out}; start nats-server with --config {args.out}")
    return 0


async def _reload_dev(args: argparse.Namespace, store: IdentityStore, new: list[Identity]) -> None:
    """A running `fuse dev --secure` on these identities: rewrite its server's authorization,
    signal it to reload, and make the consumers of new agents."""
    settings = settings_from_args(args)
    state = read_dev_state(settings)
    if state is None or state.credentials is None:
        return
    if Path(state.credentials).parent != store.directory:
        return  # that dev runs on other identities
    reload_server(settings, store, Path(state.data_dir), [s.pid for s in state.servers])
    if any(identity.role == "agent" for identity in new):
        from newfuse.agents.secure import provision
        from newfuse.nats import connect
        from newfuse.nats.connection import Credentials

        nc = await connect(
            state.nats_url, credentials=Credentials.load(state.credentials), ca=state.ca
        )
        try:
            await provision(nc, new, settings.prefix)
        finally:
            await nc.close()
    note(f"fuse dev (pid {state.pid}) reloaded its authorization")


def ensure_system_identity(store: IdentityStore) -> Identity:
    """The first active `system` identity of `store`, made (named `system`, or `system-2`…
    if that name is taken) when there is none: what a secure `fuse dev` hears the server's
    refused logins as."""
    return _ensure(store, "system", "system", lambda i: True)


def ensure_key_service_identity(store: IdentityStore) -> Identity:
    """The `service` identity a secure `fuse dev` runs its key service as (named `keys`, or
    `keys-2`… if that name is taken), made when there is none."""
    return _ensure(store, "service", "keys", lambda i: i.name.split("-")[0] == "keys")


def _ensure(
    store: IdentityStore, role: Role, base: str, fits: Callable[[Identity], bool]
) -> Identity:
    identities = store.list()
    active = [i for i in identities if i.role == role and not i.revoked and fits(i)]
    if active:
        return active[0]
    taken = {i.name for i in identities}
    name = next(n for n in (base, *(f"{base}-{k}" for k in range(2, 10**6))) if n not in taken)
    return store.add(name, role)


def write_dev_config(path: Path, store: IdentityStore, prefix: str, server_name: str) -> None:
    """The configuration file a secure `fuse dev` gives its nats-server: the authorization of
    `store`'s identities, and the server's name (a reload refuses a file that lacks what the
    command line set)."""
    text = server_config(store.list(), Subjects(prefix))
    write_private(path, f"server_name: {json.dumps(server_name)}\n{text}")


def reload_server(
    settings: Settings, store: IdentityStore, data_dir: Path, pids: list[int]
) -> None:
    """Rewrite `<data dir>/auth.conf` and SIGHUP the nats-server processes of `pids`."""
    write_dev_config(data_dir / AUTH_CONFIG, store, settings.prefix, DEV_SERVER_NAME)
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip().startswith("nats-server"):
                os.kill(pid, signal.SIGHUP)
        except OSError:
            continue
