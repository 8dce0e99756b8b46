"""`fuse dev`: embedded NATS (JetStream) and valkey, kept up until Ctrl-C or SIGTERM; with
`--secure`, identities the server enforces; with `--tls`, TLS to the server under a throwaway CA."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from newfuse.cli._common import (
    DevServer,
    DevState,
    dev_state_path,
    process_started,
    read_dev_state,
    settings_from_args,
    write_dev_state,
)
from newfuse.cli._read_models import extra_projections
from newfuse.cli.auth import (
    AUTH_CONFIG,
    DEV_SERVER_NAME,
    ensure_key_service_identity,
    ensure_system_identity,
    write_dev_config,
)
from newfuse.config import Settings
from newfuse.errors import ConfigError, DevAlreadyRunningError
from newfuse.eventstore import open_event_store
from newfuse.nats.cluster import NatsCluster
from newfuse.nats.connection import Credentials
from newfuse.nats.embedded import (
    NatsServer,
    ServerRestart,
    ValkeyServer,
    describe_exit,
    keep_alive,
)
from newfuse.nats.tls import Certificates, make_certificates
from newfuse.projections import ProjectionGroup
from newfuse.projections.builtin import BuiltinProjections
from newfuse.projections.health import add_health_option, operations
from newfuse.security import with_keys
from newfuse.security.auth_events import recording_auth_failures
from newfuse.security.events import sync_identities
from newfuse.security.identities import IdentityStore
from newfuse.security.key_service import serving_keys
from newfuse.security.valkey import ensure_projection_user, with_user


def _cluster_size(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"a cluster needs 2 or more nodes, got {text!r}")
    return int(text)


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "dev",
        help="run embedded NATS and valkey servers for development",
        description=(
            "Start nats-server (JetStream) and valkey-server on free loopback ports, run the "
            "built-in projections (agent state, audit index, transactions), print FUSE_NATS_URL=, "
            "FUSE_REDIS_URL= and FUSE_AUDIT_DB= lines (and FUSE_NATS_CA= with --tls), and run "
            "until Ctrl-C or SIGTERM. "
            "A server that dies is restarted on the same port with the same data (said on "
            "stderr and in the state file). Other fuse commands find them when nothing is "
            "configured."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep server data here (default: a temporary directory removed on exit)",
    )
    parser.add_argument(
        "--cluster",
        type=_cluster_size,
        metavar="N",
        help="run a JetStream cluster of N nats-server nodes instead of one server",
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="require identities (`fuse auth`): the server enforces each one's permissions; "
        "an admin identity is made if there is none, and every other command uses it; "
        "refused logins are recorded (auth.failed), heard as a system identity",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="nats-server requires TLS, with a certificate of a throwaway CA made in the data "
        "directory (printed as FUSE_NATS_CA=; other commands find it); one server only",
    )
    add_health_option(parser)
    parser.set_defaults(handler=run_dev)


class _Recorder:
    """The state file of this `fuse dev`: written at start, rewritten after each restart."""

    def __init__(
        self,
        settings: Settings,
        state: DevState,
        servers: dict[str, NatsServer | ValkeyServer],
    ) -> None:
        self.settings = settings
        self.state = state
        self.servers = servers
        self.path = dev_state_path(settings)
        self.restarts: dict[str, tuple[int, str]] = {}

    def write(self) -> None:
        entries = []
        for label, server in self.servers.items():
            restarts, last_exit = self.restarts.get(label, (0, None))
            entries.append(
                DevServer(
                    name=label,
                    pid=server.pid or 0,
                    url=server.url,
                    data_dir=str(server.data_dir),
                    restarts=restarts,
                    last_exit=last_exit,
                )
            )
        self.state = msgspec.structs.replace(self.state, servers=tuple(entries))
        write_dev_state(self.settings, self.state)

    def reporter(self, label: str) -> Callable[[ServerRestart], None]:
        """What `keep_alive` calls when it restarted the server `label`."""
        return lambda restart: self.restarted(label, restart)

    def restarted(self, label: str, restart: ServerRestart) -> None:
        # said before it is recorded: whoever sees the new pid in the state file can find the line
        said = f"fuse dev: {label}: {restart}; recording in {self.path}"
        print(said, file=sys.stderr, flush=True)
        self.restarts[label] = (restart.restarts, describe_exit(restart.status))
        self.write()

    def remove(self) -> None:
        recorded = read_dev_state(self.settings)
        if recorded is not None and recorded.pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


async def run_dev(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    data_dir: Path | None = args.data_dir
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    state_path = dev_state_path(settings)
    running_dev = read_dev_state(settings)
    if running_dev is not None:
        raise DevAlreadyRunningError(
            pid=running_dev.pid, nats_url=running_dev.nats_url, state_file=str(state_path)
        )
    with contextlib.ExitStack() as cleanup:
        root = data_dir or Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fuse-dev-"))
        )
        root.mkdir(parents=True, exist_ok=True)
        audit_db = str(root / "read-models.db")
        for flag, given in (("--secure", args.secure), ("--tls", args.tls)):
            if given and args.cluster:
                raise ConfigError(
                    variable=flag, value=True, reason="not with --cluster yet: use one server"
                )
        admin = _secure(settings, root) if args.secure else None
        certificates = _certificates(root) if args.tls else None
        ca = None if certificates is None else str(certificates.ca)
        nats: NatsServer | NatsCluster = (
            NatsCluster(size=args.cluster, data_dir=root / "nats", name="fuse-dev")
            if args.cluster
            else NatsServer(
                data_dir=root / "nats",
                server_name=DEV_SERVER_NAME,
                config=root / AUTH_CONFIG if admin else None,
                tls=certificates,
            )
        )
        credentials = Credentials.load(admin) if admin is not None else None
        # secure: valkey's default user gets a password (the admin's, in the owner-only
        # state file); the projection runners get a user limited to their keys
        redis_password = secrets.token_urlsafe(24) if admin is not None else None
        async with (
            nats,
            ValkeyServer(
                data_dir=root / "valkey",
                extra_args=["--requirepass", redis_password] if redis_password else None,
            ) as valkey,
            await with_keys(
                await open_event_store(
                    nats.url,
                    prefix=settings.prefix,
                    replicas=settings.replicas,
                    election_timeout=settings.election_timeout,
                    credentials=credentials,
                    ca=ca,
                    # its readers are the projections and the security recorders, which never
                    # look at who signed an event: a signature check would make them ~4x slower
                    signers=False,
                ),
                settings,
            ) as store,
            await BuiltinProjections.open(
                redis_url=await _runners_redis(valkey.url, redis_password, settings.prefix),
                audit_db=audit_db,
                prefix=settings.prefix,
                extra=extra_projections(),
            ) as builtin,
            operations(settings, store, runners := builtin.runners(store), health=args.health),
            contextlib.AsyncExitStack() as listeners,
        ):
            servers: dict[str, NatsServer | ValkeyServer] = (
                {f"nats-server {node.server_name}": node for node in nats.nodes}
                if isinstance(nats, NatsCluster)
                else {"nats-server": nats}
            )
            servers["valkey-server"] = valkey
            recorder = _Recorder(
                settings,
                DevState(
                    pid=os.getpid(),
                    nats_url=nats.url,
                    redis_url=with_user(valkey.url, "default", redis_password)
                    if redis_password
                    else valkey.url,
                    audit_db=audit_db,
                    prefix=settings.prefix,
                    data_dir=str(root),
                    started=process_started(os.getpid()),
                    credentials=str(admin) if admin is not None else None,
                    ca=ca,
                ),
                servers,
            )
            if admin is not None:
                made = await _provision(nats.url, credentials, settings, ca)
                identities = IdentityStore(Path(admin).parent)
                # identities made or revoked while no bus ran: into the log now
                await sync_identities(store, identities.list(), by="fuse dev")
                # the logins the server refuses, heard in its system account: into the log
                system = ensure_system_identity(identities).name
                await listeners.enter_async_context(
                    recording_auth_failures(
                        nats.url,
                        identities.credentials(system),
                        store,
                        seen_by="fuse dev",
                        identify=identities.name_of,
                        ca=ca,
                    )
                )
                # agents seal and open fields through it, never holding a key
                keys = ensure_key_service_identity(identities).name
                await listeners.enter_async_context(
                    serving_keys(
                        nats.url,
                        credentials=identities.credentials(keys),
                        prefix=settings.prefix,
                        ca=ca,
                        topics=lambda name: _topics_of(identities, name),
                    )
                )
                print(
                    f"fuse dev: secure: identities in {Path(admin).parent} ({made} agent "
                    f"consumer(s) made); other commands connect as {Path(admin).stem}; refused "
                    f"logins are recorded (auth.failed, heard as {system}); the key service "
                    f"runs as {keys}",
                    file=sys.stderr,
                )
            else:  # no identities: agents could read the keys, but use it all the same
                await listeners.enter_async_context(
                    serving_keys(nats.url, credentials=None, prefix=settings.prefix, ca=ca)
                )
            projections = ProjectionGroup(runners)
            running = asyncio.create_task(projections.run(handle_signals=False))
            keepers = [
                asyncio.create_task(
                    keep_alive(server, recorder.reporter(label)),
                    name=f"keep {label} alive",
                )
                for label, server in servers.items()
            ]
            recorder.write()
            stopping = asyncio.create_task(stop.wait())
            try:
                print(f"FUSE_NATS_URL={nats.url}")
                print(f"FUSE_REDIS_URL={valkey.url}")
                print(f"FUSE_AUDIT_DB={audit_db}")
                if ca is not None:
                    print(f"FUSE_NATS_CA={ca}")
                sys.stdout.flush()
                pids = ", ".join(f"{label} pid {server.pid}" for label, server in servers.items())
                # the store picks the replica count on a cluster: say what it chose
                copies = getattr(store, "replicas", 0)
                stream = getattr(store, "stream_name", "?")
                print(
                    f"fuse dev: {pids}, projections {', '.join(builtin.names)} running; events "
                    f"in {stream} with {copies} replica(s); recorded in {state_path}; Ctrl-C "
                    f"to stop",
                    file=sys.stderr,
                )
                await asyncio.wait(
                    [stopping, running, *keepers], return_when=asyncio.FIRST_COMPLETED
                )
                print("fuse dev: stopping", file=sys.stderr)
            finally:
                stopping.cancel()
                projections.request_stop()
                await running
                # keepers go before the servers stop, so a deliberate stop is never "restarted"
                for keeper in keepers:
                    keeper.cancel()
                await asyncio.wait(keepers)
                recorder.remove()
            for keeper in keepers:
                error = None if keeper.cancelled() else keeper.exception()
                if error is not None:
                    raise error  # a server that could not be kept up (ServerStartError)
    return 0


def _topics_of(identities: IdentityStore, name: str) -> tuple[str, ...]:
    """The topics the agent identity `name` reads (its shared consumer's), none when unknown."""
    found = [i for i in identities.list() if i.name == name and not i.revoked]
    return found[0].topics if found else ()


def _secure(settings: Settings, root: Path) -> Path:
    """The identities of a secure dev (an `admin` made when there is no admin, a `system` one
    when there is none), the server's authorization written to `<root>/auth.conf`; returns the
    admin's credentials file."""
    store = IdentityStore(Path(settings.state_dir) / "auth")
    admins = [i for i in store.list() if i.role == "admin" and not i.revoked]
    admin = admins[0] if admins else store.add("admin", "admin")
    ensure_system_identity(store)
    ensure_key_service_identity(store)
    write_dev_config(root / AUTH_CONFIG, store, settings.prefix, DEV_SERVER_NAME)
    return store.seed_file(admin.name)


async def _runners_redis(url: str, password: str | None, prefix: str) -> str:
    """The URL the projection runners use: the plain one, or (secure) their ACL user's."""
    if password is None:
        return url
    return await ensure_projection_user(with_user(url, "default", password), prefix)


def _certificates(root: Path) -> Certificates:
    """The TLS certificates of this dev's nats-server: the ones a `--data-dir` kept from an
    earlier run (its clients' CA stays valid), else a new throwaway CA and server certificate."""
    folder = root / "tls"
    return Certificates.existing(folder) or make_certificates(folder)


async def _provision(
    url: str, credentials: Credentials | None, settings: Settings, ca: str | None
) -> int:
    from newfuse.agents.secure import provision
    from newfuse.nats import connect

    store = IdentityStore(Path(settings.state_dir) / "auth")
    nc = await connect(url, name="fuse-dev-provision", credentials=credentials, ca=ca)
    try:
        return len(await provision(nc, store.list(), settings.prefix))
    finally:
        await nc.close()
